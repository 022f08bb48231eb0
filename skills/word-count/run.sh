#!/usr/bin/env bash
# Reads {"text": "..."} on stdin and prints the number of words in text.
set -euo pipefail
python3 -c 'import json, sys; print(len(json.load(sys.stdin)["text"].split()))'
