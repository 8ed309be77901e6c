#!/usr/bin/env bash
# The vllm-omni documentation's call, unchanged: one 1024x1024 PNG from /v1/images/generations.
set -euo pipefail
URL=${URL:-http://localhost:8000}
curl -sf -X POST "$URL/v1/images/generations" \
  -H "Content-Type: application/json" \
  -d '{
    "prompt": "a dragon laying over the spine of the Green Mountains of Vermont",
    "size": "1024x1024",
    "seed": 42
  }' | python3 -c 'import sys, json, base64; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))' > dragon.png
echo "wrote dragon.png"

# Chat completions with image output; parameters nested in "extra_body" as in vllm-omni's example.
curl -sf "$URL/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -d '{
    "messages": [{"role": "user", "content": "A beautiful landscape painting"}],
    "extra_body": {"height": 512, "width": 512, "num_inference_steps": 4, "seed": 42}
  }' | python3 -c 'import sys, json; c = json.load(sys.stdin)["choices"][0]["message"]["content"]; print(len(c), "image(s),", c[0]["image_url"]["url"][:40] + "...")'
