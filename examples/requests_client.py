"""A plain `requests` client: one image from /v1/images/generations, saved as PNG."""

import base64
import io
import os
import sys

import requests
from PIL import Image

URL = os.environ.get("URL", "http://localhost:8000")

response = requests.post(
    f"{URL}/v1/images/generations",
    json={"prompt": "a black and white cat wearing a princess tiara", "size": "512x512", "seed": 42},
    timeout=600,
)
if response.status_code != 200:
    sys.exit(f"{response.status_code}: {response.json()['error']['message']}")
image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
image.save("cat.png")
print("wrote cat.png", image.size)
