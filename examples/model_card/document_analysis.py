# Document (OCR) and chart analysis: the working-examples article's "Document Understanding" sample, run on phivision.
#
# Source: Mingrui Gao (Research Graph), "What is Phi-3.5-vision? Explained with Working Examples",
#   https://medium.com/@researchgraph/what-is-phi-3-5-vision-101ce7c4d410 , section "Document Understanding"
#   (also researchgraph/obsidian-weekly-articles on GitHub: 2025/02/2025-02-19-what-is-phi-3-5-vision/index.md).
#
# Differences from the article's code, and nothing else:
#   1. AutoModelForCausalLM and AutoProcessor are imported from phivision.compat instead of transformers;
#      `os` and `pathlib` are imported for the changes below.
#   2. model_id is $PHIVISION_MODEL (default "microsoft/Phi-3.5-vision-instruct", the article's id).
#   3. device_map= and the device the inputs are moved to are $PHIVISION_DEVICE (default "cuda"; the article
#      writes device_map="cuda" and .to("cuda:0"), which is the same GPU).
#   4. The images are the local examples/images/document.png and chart.png (the article opens a page of a
#      scientific paper, "paper.png", and a chart from it), and the two requests are worded for them.
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
  num_crops=16  # one dense page per request: the finer grid
)

def generate_response(messages, images):
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

    generate_ids = generate_ids[:, inputs['input_ids'].shape[1]:]
    response = processor.batch_decode(generate_ids,
      skip_special_tokens=True,
      clean_up_tokenization_spaces=False)[0]

    return response

# Load document images
document_page = Image.open(images_dir / "document.png")
chart_image = Image.open(images_dir / "chart.png")

# Analyze document page
document_prompt = """
<|image_1|>
This is one page of a report. Read it and give:
1. The organisation and the title of the report
2. The headings on the page
3. The main points of the text
4. Every table, with its rows and numbers

Quote the text exactly where you can.
"""

document_conversation = [
    {"role": "user", "content": document_prompt}
]

document_response = generate_response(document_conversation, [document_page])
document_conversation.append({"role": "assistant", "content": document_response})

print("Document Analysis:")
print(document_response)
print("\n" + "="*50 + "\n")

# Analyze chart
chart_prompt = """
<|image_1|>
This is a chart. Explain it, covering:
1. What kind of chart it is
2. Its title
3. What each axis measures
4. The value of every bar
5. The largest and the smallest value

Finish with one sentence on what the chart tells a reader.
"""

chart_conversation = [
    {"role": "user", "content": chart_prompt}
]

chart_response = generate_response(chart_conversation, [chart_image])
chart_conversation.append({"role": "assistant", "content": chart_response})

print("Chart Analysis:")
print(chart_response)
print("\n" + "="*50 + "\n")
