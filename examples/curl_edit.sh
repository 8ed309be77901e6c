#!/usr/bin/env bash
# An image edit with curl (multipart, as OpenAI's /v1/images/edits takes it): first make an image,
# then edit it, then inpaint a square of it with a mask whose transparent pixels mark where.
set -euo pipefail
URL=${URL:-http://localhost:8000}
PY=${PYTHON:-python3}  # a Python with Pillow, for the mask
AUTH=()
[ -n "${API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $API_KEY")

curl -sf "${AUTH[@]}" -X POST "$URL/v1/images/generations" -H "Content-Type: application/json" \
  -d '{"prompt": "a wooden cabin in a snowy forest", "size": "256x256", "seed": 1}' \
  | "$PY" -c 'import base64, json, sys; open("cabin.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'

curl -sf "${AUTH[@]}" -X POST "$URL/v1/images/edits" \
  -F image=@cabin.png -F prompt="the same cabin at night, warm light in the windows" -F strength=0.6 -F seed=2 \
  | "$PY" -c 'import base64, json, sys; d = json.load(sys.stdin); open("cabin-night.png", "wb").write(base64.b64decode(d["data"][0]["b64_json"])); print("edit:", d["size"], d["usage"])'

"$PY" - <<'PY'
from PIL import Image
mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
mask.paste((0, 0, 0, 0), (64, 64, 192, 192))  # fully transparent: repaint here
mask.save("mask.png")
PY
curl -sf "${AUTH[@]}" -X POST "$URL/v1/images/edits" \
  -F image=@cabin.png -F mask=@mask.png -F prompt="a frozen lake" -F seed=3 \
  | "$PY" -c 'import base64, json, sys; open("cabin-lake.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"])); print("inpaint: wrote cabin-lake.png")'
