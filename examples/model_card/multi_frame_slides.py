# Multi-frame summarisation: the slide-deck sample of the Phi-3.5-vision-instruct model card, run on phivision.
#
# Source: the model card, https://huggingface.co/microsoft/Phi-3.5-vision-instruct , section
#   "Loading the model locally" (the only code sample of the card).
#
# Differences from the card, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below, `requests` is no longer needed.
#   2. model_id is $PHIVISION_MODEL (default "microsoft/Phi-3.5-vision-instruct", the card's id).
#   3. device_map= and the device the inputs are moved to are $PHIVISION_DEVICE (default "cuda"; the card
#      writes device_map="cuda" and .to("cuda:0"), which is the same GPU).
#   4. The frames are the four local slides examples/images/slides/slide1..4.png, opened with Image.open,
#      instead of 19 slides fetched with requests.get, so the loop runs over range(1, 5), not range(1, 20).
#   5. $PHIVISION_MAX_NEW_TOKENS, when set, replaces max_new_tokens (the tests use 8 to stay fast).
import os
from pathlib import Path

from PIL import Image
from phivision.compat import AutoModelForCausalLM
from phivision.compat import AutoProcessor

model_id = os.environ.get("PHIVISION_MODEL", "microsoft/Phi-3.5-vision-instruct")
device = os.environ.get("PHIVISION_DEVICE", "cuda")
images_dir = Path(__file__).resolve().parent.parent / "images"

# Note: set _attn_implementation='eager' if you don't have flash_attn installed
model = AutoModelForCausalLM.from_pretrained(
  model_id,
  device_map=device,
  trust_remote_code=True,
  torch_dtype="auto",
  _attn_implementation='flash_attention_2'
)

# for best performance, use num_crops=4 for multi-frame, num_crops=16 for single-frame.
processor = AutoProcessor.from_pretrained(model_id,
  trust_remote_code=True,
  num_crops=4
)

images = []
placeholder = ""

# Note: if OOM, you might consider reduce number of frames in this example.
for i in range(1, 5):
    images.append(Image.open(images_dir / "slides" / f"slide{i}.png"))
    placeholder += f"<|image_{i}|>\n"

messages = [
    {"role": "user", "content": placeholder+"Summarize the deck of slides."},
]

prompt = processor.tokenizer.apply_chat_template(
  messages,
  tokenize=False,
  add_generation_prompt=True
)

inputs = processor(prompt, images, return_tensors="pt").to(device)

generation_args = {
    "max_new_tokens": int(os.environ.get("PHIVISION_MAX_NEW_TOKENS", "1000")),
    "temperature": 0.0,
    "do_sample": False,
}

generate_ids = model.generate(**inputs,
  eos_token_id=processor.tokenizer.eos_token_id,
  **generation_args
)

# remove input tokens
generate_ids = generate_ids[:, inputs['input_ids'].shape[1]:]
response = processor.batch_decode(generate_ids,
  skip_special_tokens=True,
  clean_up_tokenization_spaces=False)[0]

print(response)
