# Chart analysis and table OCR with a hand-written prompt string: the Phi-3 Cookbook's vision inference
# samples, run on phivision.
#
# Source: microsoft/Phi-3CookBook on GitHub, md/03.Inference/Vision_Inference.md, sections "0. Preparation",
#   "1. Analyze the image with Phi-3-Vision" and "2. OCR with Phi-3-Vision". Unlike the model card, these
#   build the prompt with an f-string instead of apply_chat_template, pass ONE image (not a list) to the
#   processor, call model.generate with keyword arguments, and decode once with skip_special_tokens=False.
#
# Differences from the cookbook's code, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below, `requests` is no longer needed.
#   2. model_id is $PHIVISION_MODEL. The default is "microsoft/Phi-3.5-vision-instruct" like the other
#      scripts; the cookbook page was written for "microsoft/Phi-3-vision-128k-instruct" (same code, same format).
#   3. The cookbook moves the model with .cuda() and the inputs with .to("cuda:0"); here both go to
#      $PHIVISION_DEVICE (default "cuda"), the model with .to(device).
#   4. The images are the local examples/images/chart.png and table.png, opened with Image.open, instead of a
#      stock chart and a book cover fetched with requests.get; the questions are worded for them.
#   5. $PHIVISION_MAX_NEW_TOKENS, when set, replaces max_new_tokens (the tests use 8 to stay fast).
#   6. The cookbook is a notebook that shows `response` after each cell; a script has to print it.
import os
from pathlib import Path

from PIL import Image
import torch
from phivision.compat import AutoModelForCausalLM
from phivision.compat import AutoProcessor

model_id = os.environ.get("PHIVISION_MODEL", "microsoft/Phi-3.5-vision-instruct")
device = os.environ.get("PHIVISION_DEVICE", "cuda")
max_new_tokens = int(os.environ.get("PHIVISION_MAX_NEW_TOKENS", "1000"))
images_dir = Path(__file__).resolve().parent.parent / "images"

kwargs = {}  # set up but never passed on, in the cookbook as well
kwargs['torch_dtype'] = torch.bfloat16

processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, torch_dtype="auto").to(device)

user_prompt = '<|user|>\n'
assistant_prompt = '<|assistant|>\n'
prompt_suffix = "<|end|>\n"

# 1. Analyse a chart
prompt = f"{user_prompt}<|image_1|>\nWhat does this chart show, and which fruit sold the most boxes?{prompt_suffix}{assistant_prompt}"

image = Image.open(images_dir / "chart.png")

inputs = processor(prompt, image, return_tensors="pt").to(device)

generate_ids = model.generate(**inputs,
                              max_new_tokens=max_new_tokens,
                              eos_token_id=processor.tokenizer.eos_token_id,
                              )
generate_ids = generate_ids[:, inputs['input_ids'].shape[1]:]

response = processor.batch_decode(generate_ids,
                                  skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)[0]
print("Chart:")
print(response)

# 2. Read a table (OCR)
prompt = f"{user_prompt}<|image_1|>\nRead this table for me: which team is first, and how many points does each team have?{prompt_suffix}{assistant_prompt}"

image = Image.open(images_dir / "table.png")

inputs = processor(prompt, image, return_tensors="pt").to(device)

generate_ids = model.generate(**inputs,
                              max_new_tokens=max_new_tokens,
                              eos_token_id=processor.tokenizer.eos_token_id,
                              )

generate_ids = generate_ids[:, inputs['input_ids'].shape[1]:]

response = processor.batch_decode(generate_ids,
                                  skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)[0]
print("Table:")
print(response)
