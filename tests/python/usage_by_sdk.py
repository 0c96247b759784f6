"""Makes two calls (one plain, one streamed) with one official SDK and prints the tokens it was told.

Usage: usage_by_sdk.py openai|anthropic. The CA to trust comes from SSL_CERT_FILE.
"""
import json
import os
import ssl
import sys

import anthropic
import openai

context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
which = sys.argv[1]
tokens = 0
if which == "openai":
    client = openai.OpenAI(api_key="sk-test", http_client=openai.DefaultHttpxClient(verify=context), max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Count my tokens"}]
    )
    tokens += completion.usage.prompt_tokens + completion.usage.completion_tokens
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count my streamed tokens"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            tokens += chunk.usage.prompt_tokens + chunk.usage.completion_tokens
elif which == "anthropic":
    client = anthropic.Anthropic(
        api_key="sk-ant-test", http_client=anthropic.DefaultHttpxClient(verify=context), max_retries=0
    )
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Count my tokens"}]
    )
    u = message.usage
    tokens += (u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
               + u.output_tokens)
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Count my streamed tokens"}]
    ) as stream:
        final = stream.get_final_message()
    u = final.usage
    tokens += (u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
               + u.output_tokens)
else:
    raise SystemExit(f"unknown SDK {which}")
print(json.dumps({"sdk": which, "tokens": tokens}))
