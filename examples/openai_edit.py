"""Image edits with the official OpenAI SDK, unchanged: images.edit with an image, with a mask, and
streamed with partial images. Extension fields (seed, strength, ...) go through extra_body."""

import base64
import io
import os

from openai import OpenAI
from PIL import Image

client = OpenAI(base_url=os.environ.get("URL", "http://localhost:8000") + "/v1", api_key=os.environ.get("API_KEY", "none"))
model = client.models.list().data[0].id

made = client.images.generate(model=model, prompt="a red fox in a meadow", size="256x256", extra_body={"seed": 1})
fox = base64.b64decode(made.data[0].b64_json)

edited = client.images.edit(model=model, image=("fox.png", fox), prompt="a red fox in a meadow, oil painting",
                            extra_body={"strength": 0.6, "seed": 2})
with open("fox-painting.png", "wb") as f:
    f.write(base64.b64decode(edited.data[0].b64_json))
print("edit", edited.size, "tokens", edited.usage.total_tokens)

mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
mask.paste((0, 0, 0, 0), (0, 0, 256, 100))  # repaint the sky
buf = io.BytesIO()
mask.save(buf, format="PNG")
inpainted = client.images.edit(model=model, image=("fox.png", fox), mask=("mask.png", buf.getvalue()), prompt="a stormy sky",
                               extra_body={"seed": 3})
with open("fox-storm.png", "wb") as f:
    f.write(base64.b64decode(inpainted.data[0].b64_json))

stream = client.images.edit(model=model, image=("fox.png", fox), prompt="a red fox at dawn", stream=True, partial_images=2,
                            extra_body={"seed": 4})
for event in stream:
    print(event.type, getattr(event, "partial_image_index", ""))
    if event.type == "image_edit.completed":
        with open("fox-dawn.png", "wb") as f:
            f.write(base64.b64decode(event.b64_json))
print("wrote fox-painting.png, fox-storm.png, fox-dawn.png")
