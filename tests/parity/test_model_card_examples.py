"""The model card's and the working-examples article's code samples (examples/model_card/), run as users run them.

Each script is run in its own interpreter on the tiny golden checkpoint (CPU, 8 new tokens): the random model
answers gibberish, so those runs check structure only (exit code 0, no traceback, a non-empty answer where
the script prints one). One in-process test follows the card's single-image flow in float32 and compares it
with the reference's golden ids, text and logits' argmax.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phivision.compat import AutoModelForCausalLM, AutoProcessor

REPO = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO / "examples" / "model_card"
NEW_TOKENS = 8
WORKERS = 2  # scripts run at a time; each gets an equal share of the cores, so none are oversubscribed
THREADS = max(1, (os.cpu_count() or WORKERS) // WORKERS)
# The real checkpoint's context; the tiny config's 2048 positions are fewer than the samples need.
LONG_CONTEXT = 131072

# Per script: a pattern whose matches are the answers it prints, and how many answers it prints.
ANSWERS = {
    "single_image.py": (r"Describing the image:\n(.*)", 1),
    "multi_frame_slides.py": (r"\A(.*)", 1),
    "multi_image_compare.py": (r"Assistant: (.*)", 1),
    "multi_turn_chat.py": (r"Assistant: (.*?)(?=\nUser: |\Z)", 3),
    "document_analysis.py": (r"(?:Document|Chart) Analysis:\n(.*?)\n\n={50}", 2),
    "chart_table_analysis.py": (r"(?:Chart|Table):\n(.*?)(?=\nTable:\n|\Z)", 2),
}


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint with max_position_embeddings raised to the real model's.

    Four slides at num_crops=4 (3053 tokens) and two images at num_crops=16 (3908) do not fit the tiny
    config's 2048 positions; only config.json differs, so the weights and their bf16 dtype are the same.
    """
    folder = tmp_path_factory.mktemp("long_context_checkpoint")
    for path in tiny_checkpoint.iterdir():
        shutil.copy2(path, folder / path.name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}, indent=1))
    return folder


def _run(script: Path, model_dir: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PHIVISION_MODEL": str(model_dir),
        "PHIVISION_DEVICE": "cpu",
        "PHIVISION_MAX_NEW_TOKENS": str(NEW_TOKENS),
        "HF_HUB_OFFLINE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": str(THREADS),
        # The package from this checkout, installed or not.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300
    )


@pytest.fixture(scope="module")
def runs(long_context_checkpoint: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every script, WORKERS at a time: most of a run is interpreter start-up, which overlaps well."""
    scripts = sorted(SCRIPTS_DIR.glob("*.py"))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = pool.map(lambda script: _run(script, long_context_checkpoint), scripts)
        return {script.name: result for script, result in zip(scripts, results)}


def test_every_script_is_checked():
    assert sorted(p.name for p in SCRIPTS_DIR.glob("*.py")) == sorted(ANSWERS)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_script_names_its_source_and_keeps_the_card_calls(name):
    text = (SCRIPTS_DIR / name).read_text(encoding="utf-8")
    header = text.split("\nimport ", 1)[0]
    assert "# Source:" in header and "Differences from" in header
    for variable in ("PHIVISION_MODEL", "PHIVISION_DEVICE", "PHIVISION_MAX_NEW_TOKENS"):
        assert variable in header, f"{name}: the header does not list the {variable} change"
        assert f'os.environ.get("{variable}"' in text
    # Images come from local files, the classes from phivision: neither transformers nor requests is needed.
    assert re.search(r"^\s*(from|import) (transformers|requests)\b", text, re.M) is None
    assert "from phivision.compat import" in text
    # The calls the samples make, which compat must keep honouring.
    for call in (
        'return_tensors="pt").to(device)',
        "eos_token_id=processor.tokenizer.eos_token_id",
        "generate_ids[:, inputs['input_ids'].shape[1]:]",
        "processor.batch_decode(generate_ids",
        "clean_up_tokenization_spaces=False)[0]",
    ):
        assert call in text, f"{name} lost the sample's {call!r}"
    if name != "chart_table_analysis.py":  # the cookbook writes its prompt strings by hand
        assert "processor.tokenizer.apply_chat_template(" in text and "add_generation_prompt=True" in text
        assert 'torch_dtype="auto"' in text and "_attn_implementation='flash_attention_2'" in text


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_script_runs_and_prints_its_answers(runs, name):
    result = runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    pattern, count = ANSWERS[name]
    answers = re.findall(pattern, result.stdout, re.S)
    assert len(answers) == count, result.stdout
    assert all(answer.strip() for answer in answers), f"an empty answer in:\n{result.stdout}"


def test_card_single_image_flow_matches_the_golden_greedy_run(tiny_checkpoint, tiny_manifest, tiny_golden, processor_golden):
    """The card's calls, in float32 (how the reference made the golden data), on the golden one-image case."""
    case = next(c for c in tiny_manifest["cases"] if c["id"] == "one_image_nc4")
    expected = case["expected"]
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_checkpoint), device_map="cpu", trust_remote_code=True, torch_dtype=torch.float32,
        _attn_implementation="eager",
    )
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=True, num_crops=case["num_crops"])
    images = [Image.open(processor_golden / path) for path in case["images"]]
    messages = [{"role": "user", "content": "<|image_1|>\nDescribe the image."}]

    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == case["prompt"]
    inputs = processor(prompt, images, return_tensors="pt").to("cpu")
    assert inputs["input_ids"][0].tolist() == expected["input_ids"]

    generation_args = {"max_new_tokens": len(expected["greedy_new_tokens"]), "temperature": 0.0, "do_sample": False}
    generate_ids = model.generate(**inputs, eos_token_id=processor.tokenizer.eos_token_id, **generation_args)
    assert torch.equal(generate_ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].cpu())
    generate_ids = generate_ids[:, inputs["input_ids"].shape[1] :]
    response = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    assert generate_ids[0].tolist() == expected["greedy_new_tokens"]
    assert response == expected["greedy_text"]

    logits = model(**inputs).logits  # (1, T, V)
    golden_argmax = load_file(str(tiny_golden / "logits.safetensors"))["one_image_nc4__argmax"]
    assert logits.shape[:2] == (1, len(expected["input_ids"]))
    assert torch.equal(logits[0].argmax(dim=-1), golden_argmax.reshape(-1))
