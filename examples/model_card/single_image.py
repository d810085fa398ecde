# Single image description: the first sample of the "working examples" article, run on phivision.
#
# Source: Mingrui Gao (Research Graph), "What is Phi-3.5-vision? Explained with Working Examples",
#   https://medium.com/@researchgraph/what-is-phi-3-5-vision-101ce7c4d410 , section "Single Image Analysis"
#   (also researchgraph/obsidian-weekly-articles on GitHub: 2025/02/2025-02-19-what-is-phi-3-5-vision/index.md).
#
# Differences from the article's code, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below.
#   2. model_id is $PHIVISION_MODEL (default "microsoft/Phi-3.5-vision-instruct", the article's id).
#   3. device_map= and the device the inputs are moved to are $PHIVISION_DEVICE (default "cuda"; the article
#      writes device_map="cuda" and .to("cuda:0"), which is the same GPU).
#   4. The image is the local examples/images/scene.png (the article opens its own "dog.png"), and the
#      request is worded for that picture.
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
  num_crops=16  # one frame: the finer grid
)

images = []
placeholder = ""

# Load local image
local_image_path = images_dir / "scene.png"
images.append(Image.open(local_image_path))
placeholder += "<|image_1|>\n"

messages = [
    {"role": "user", "content": placeholder+"Describe this picture: what is in it, where things are, and the weather."},
]

prompt = processor.tokenizer.apply_chat_template(
  messages,
  tokenize=False,
  add_generation_prompt=True
)

inputs = processor(prompt, images, return_tensors="pt").to(device)

generation_args = {
    "max_new_tokens": int(os.environ.get("PHIVISION_MAX_NEW_TOKENS", "1000")),
    "temperature": 0.7,
    "do_sample": True,
    "top_k": 50,
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

print("\nDescribing the image:")
print(response)
