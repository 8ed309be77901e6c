"""The official OpenAI SDK as a client, unchanged: images.generate and chat.completions.create.
Extension fields (seed, num_inference_steps, ...) go through extra_body."""

import base64
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("URL", "http://localhost:8000") + "/v1", api_key=os.environ.get("API_KEY", "none"))
model = client.models.list().data[0].id  # the served model name

result = client.images.generate(model=model, prompt="a horse jumping over a fence nearby a babbling brook", n=1, size="512x512", response_format="b64_json", extra_body={"seed": 42})
with open("horse.png", "wb") as f:
    f.write(base64.b64decode(result.data[0].b64_json))
print("wrote horse.png")

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A beautiful landscape painting"}], extra_body={"size": "512x512", "seed": 42})
content = chat.choices[0].message.content  # a list of image_url parts (the SDK types it loosely)
print("chat returned", len(content), "image(s)")
