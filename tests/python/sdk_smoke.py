"""Runs the official SDKs against the (intercepted) providers and prints one JSON line of results.

The CA to trust comes from SSL_CERT_FILE (as a pod with the enterprise trust bundle mounted would set).
"""
import json
import os
import ssl

import anthropic
import openai

context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
results = {}

client = openai.OpenAI(api_key="sk-test", http_client=openai.DefaultHttpxClient(verify=context), max_retries=0)
completion = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
)
results["openai_chat"] = completion.choices[0].message.content
results["openai_chat_usage"] = completion.usage.total_tokens
stream = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Say hello"}],
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
results["openai_stream"] = "".join(pieces)
results["openai_stream_usage"] = usage

claude = anthropic.Anthropic(
    api_key="sk-ant-test", http_client=anthropic.DefaultHttpxClient(verify=context), max_retries=0
)
message = claude.messages.create(
    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
)
results["anthropic_message"] = message.content[0].text
results["anthropic_usage"] = [message.usage.input_tokens, message.usage.output_tokens]
with claude.messages.stream(
    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
results["anthropic_stream"] = text
results["anthropic_stream_usage"] = [final.usage.input_tokens, final.usage.output_tokens]
print(json.dumps(results))
