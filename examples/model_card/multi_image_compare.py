# Several images in one question: the "Multiple Image Analysis" sample of the working-examples article, run on phivision.
#
# Source: Mingrui Gao (Research Graph), "What is Phi-3.5-vision? Explained with Working Examples",
#   https://medium.com/@researchgraph/what-is-phi-3-5-vision-101ce7c4d410 , section "Multiple Image Analysis"
#   (also researchgraph/obsidian-weekly-articles on GitHub: 2025/02/2025-02-19-what-is-phi-3-5-vision/index.md).
#
# Differences from the article's code, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below.
#   2. model_id is $PHIVISION_MODEL (default "microsoft/Phi-3.5-vision-instruct", the article's id).
#   3. device_map= and the device the inputs are moved to are $PHIVISION_DEVICE (default "cuda"; the article
#      writes device_map="cuda" and .to("cuda:0"), which is the same GPU).
#   4. The images are the local examples/images/scene.png and chart.png (the article opens its own "dog.png"
#      and "cat.png"), and the request is worded for them.
#   5. $PHIVISION_MAX_NEW_TOKENS, when set, replaces max_new_tokens (the tests use 8 to stay fast).
import os
from pathlib import Path

from PIL import Image
from phivision.compat import AutoModelForCausalLM, AutoProcessor

model_id = os.environ.get("PHIVISION_MODEL", "microsoft/Phi-3.5-vision-instruct")
device = os.environ.get("PHIVISION_DEVICE", "cuda")
images_dir = Path(__file__).resolve().parent.parent / "images"

model = AutoModelForCausalLM.from_pretrained(
  model_id,
  device_map=device,
  trust_remote_code=True,
  torch_dtype="auto",
  _attn_implementation='flash_attention_2'
)

processor = AutoProcessor.from_pretrained(model_id,
  trust_remote_code=True,
  num_crops=4  # several frames: the coarser grid
)

def generate_response(messages, images):
    prompt = processor.tokenizer.apply_chat_template(
      messages,
      tokenize=False,
      add_generation_prompt=True
    )

    inputs = processor(prompt, images, return_tensors="pt").to(device)

    generation_args = {
        "max_new_tokens": int(os.environ.get("PHIVISION_MAX_NEW_TOKENS", "500")),
        "temperature": 0.7,
        "do_sample": True,
        "top_k": 50,
    }

    generate_ids = model.generate(**inputs,
      eos_token_id=processor.tokenizer.eos_token_id,
      **generation_args
    )

    generate_ids = generate_ids[:, inputs['input_ids'].shape[1]:]
    response = processor.batch_decode(generate_ids,
      skip_special_tokens=True,
      clean_up_tokenization_spaces=False)[0]

    return response

# Load images
image1 = Image.open(images_dir / "scene.png")
image2 = Image.open(images_dir / "chart.png")

# Multi-image prompt
multi_image_prompt = """
<|image_1|>
<|image_2|>
Here are two quite different pictures. Describe each one in turn, then say what sets them apart.
"""

conversation = [
    {"role": "user", "content": multi_image_prompt}
]

response = generate_response(conversation, [image1, image2])
conversation.append({"role": "assistant", "content": response})

# Print the conversation
for message in conversation:
    print(f"{message['role'].capitalize()}: {message['content']}\n")
