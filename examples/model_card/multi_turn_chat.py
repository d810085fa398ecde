# Multi-turn chat about images (assistant turns fed back in): the working-examples article's
# "Multi-turn Conversation with Images" sample, run on phivision.
#
# Source: Mingrui Gao (Research Graph), "What is Phi-3.5-vision? Explained with Working Examples",
#   https://medium.com/@researchgraph/what-is-phi-3-5-vision-101ce7c4d410 , section
#   "Multi-turn Conversation with Images" (also researchgraph/obsidian-weekly-articles on GitHub:
#   2025/02/2025-02-19-what-is-phi-3-5-vision/index.md). The model card's "Input Formats" section shows
#   the same multi-turn prompt layout.
#
# Differences from the article's code, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below.
#   2. model_id is $PHIVISION_MODEL (default "microsoft/Phi-3.5-vision-instruct", the article's id).
#   3. device_map= and the device the inputs are moved to are $PHIVISION_DEVICE (default "cuda"; the article
#      writes device_map="cuda" and .to("cuda:0"), which is the same GPU).
#   4. The images are the local examples/images/scene.png and chart.png (the article opens its own "dog.png"
#      and "cat.png"), and the three questions are worded for them.
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
  num_crops=16
)

def generate_response(messages, images):
    prompt = processor.tokenizer.apply_chat_template(
      messages,
      tokenize=False,
      add_generation_prompt=True
    )

    inputs = processor(prompt, images, return_tensors="pt").to(device)

    generation_args = {
        "max_new_tokens": int(os.environ.get("PHIVISION_MAX_NEW_TOKENS", "300")),
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

# Multi-turn conversation
conversation = []

# Turn 1: the first image, on its own
conversation.append({"role": "user", "content": "<|image_1|>\nWhat can you see in this picture?"})
response1 = generate_response([conversation[-1]], [image1])
conversation.append({"role": "assistant", "content": response1})

# Turn 2: a follow-up about the same image; the whole history goes back in
conversation.append({"role": "user", "content": "What colour is the roof of the house?"})
response2 = generate_response(conversation, [image1])
conversation.append({"role": "assistant", "content": response2})

# Turn 3: a second image joins the chat; both images are passed, in tag order
conversation.append({"role": "user", "content": "<|image_2|>\nNow look at this second picture. How does it differ from the first?"})
response3 = generate_response(conversation, [image1, image2])
conversation.append({"role": "assistant", "content": response3})

# Print the conversation
for message in conversation:
    print(f"{message['role'].capitalize()}: {message['content']}\n")
