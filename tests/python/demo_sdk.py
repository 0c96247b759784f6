"""Two calls with one official SDK, reporting each outcome (the demo's second call may be refused).

Usage: demo_sdk.py openai|anthropic. The CA to trust comes from SSL_CERT_FILE. Prints one JSON object:
{"sdk": ..., "calls": [{"ok": true, "tokens": N} | {"ok": false, "status": 429, "error": "..."}]}.
"""
import json
import os
import ssl
import sys

import anthropic
import openai

context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
which = sys.argv[1]
calls = []
for i in range(2):
    try:
        if which == "openai":
            client = openai.OpenAI(
                api_key="sk-demo", http_client=openai.DefaultHttpxClient(verify=context), max_retries=0
            )
            r = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"demo call {i + 1}"}]
            )
            calls.append({"ok": True, "tokens": r.usage.prompt_tokens + r.usage.completion_tokens})
        else:
            client = anthropic.Anthropic(
                api_key="sk-ant-demo", http_client=anthropic.DefaultHttpxClient(verify=context), max_retries=0
            )
            r = client.messages.create(
                model="claude-sonnet-4-5", max_tokens=64,
                messages=[{"role": "user", "content": f"demo call {i + 1}"}],
            )
            calls.append({"ok": True, "tokens": r.usage.input_tokens + r.usage.output_tokens})
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        calls.append({"ok": False, "status": e.status_code, "error": type(e).__name__, "message": str(e)[:200]})
print(json.dumps({"sdk": which, "calls": calls}))
