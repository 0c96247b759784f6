"""Drives the official SDKs through the interceptor and prints, as one JSON object, what each call
saw: the provider's request/response id and the usage the SDK read (when the API returned it).

The CA to trust comes from SSL_CERT_FILE (a pod with the enterprise trust bundle mounted).
"""
import json
import os
import ssl

import anthropic
import openai
from google import genai
from google.genai import types

context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
results = {}
ask = [{"role": "user", "content": "Say hello"}]

client = openai.OpenAI(api_key="sk-test", http_client=openai.DefaultHttpxClient(verify=context), max_retries=0)

completion = client.chat.completions.create(model="gpt-4o-mini", messages=ask)
u = completion.usage
results["openai_chat"] = {
    "id": completion._request_id,
    "text": completion.choices[0].message.content,
    "usage": [u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens],
}

# A stream without include_usage: the interceptor injects it and must hide the extra chunk again.
stream = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ask, stream=True)
request_id = stream.headers.get("x-request-id")
saw_usage, saw_empty_choices, pieces = False, False, []
for chunk in stream.parse():
    saw_usage |= chunk.usage is not None or "usage" in (chunk.model_extra or {}) or "usage" in chunk.model_fields_set
    saw_empty_choices |= not chunk.choices
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
results["openai_stream_plain"] = {
    "id": request_id,
    "text": "".join(pieces),
    "saw_usage": saw_usage,
    "saw_empty_choices": saw_empty_choices,
}

stream = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=ask, stream=True, stream_options={"include_usage": True}
)
request_id = stream.headers.get("x-request-id")
usage = None
for chunk in stream.parse():
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.prompt_tokens_details.cached_tokens,
                 chunk.usage.completion_tokens]
results["openai_stream_usage"] = {"id": request_id, "usage": usage}

raw = client.responses.with_raw_response.create(model="gpt-4.1", input="Say hello", stream=True)
request_id = raw.headers.get("x-request-id")
usage, text = None, []
for event in raw.parse():
    if event.type == "response.output_text.delta":
        text.append(event.delta)
    if event.type == "response.completed":
        u = event.response.usage
        usage = [u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens,
                 u.output_tokens_details.reasoning_tokens]
results["openai_responses_stream"] = {"id": request_id, "text": "".join(text), "usage": usage}

response = client.responses.create(model="gpt-4.1", input="Say hello")
u = response.usage
results["openai_responses"] = {
    "id": response._request_id,
    "text": response.output_text,
    "usage": [u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens,
              u.output_tokens_details.reasoning_tokens],
}

embeddings = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
results["openai_embeddings"] = {
    "id": embeddings._request_id,
    "vectors": len(embeddings.data),
    "usage": [embeddings.usage.prompt_tokens],
}

claude = anthropic.Anthropic(
    api_key="sk-ant-test", http_client=anthropic.DefaultHttpxClient(verify=context), max_retries=0
)
message = claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=ask)
u = message.usage
results["anthropic_message"] = {
    "id": message._request_id,
    "text": message.content[0].text,
    "usage": [u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens],
}
with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=ask) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
    request_id = stream.response.headers.get("request-id")
u = final.usage
results["anthropic_stream"] = {
    "id": request_id,
    "text": text,
    "usage": [u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens, u.output_tokens],
}

gemini = genai.Client(api_key="gemini-test", http_options=types.HttpOptions(client_args={"verify": context}))
response = gemini.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
m = response.usage_metadata
results["gemini_generate"] = {
    "id": response.response_id,
    "text": response.text,
    "usage": [m.prompt_token_count, m.cached_content_token_count, m.candidates_token_count, m.thoughts_token_count],
}
text, last = [], None
for chunk in gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="Say hello"):
    text.append(chunk.text or "")
    last = chunk
m = last.usage_metadata
results["gemini_stream"] = {
    "id": last.response_id,
    "text": "".join(text),
    "usage": [m.prompt_token_count, m.cached_content_token_count, m.candidates_token_count, m.thoughts_token_count],
}
print(json.dumps(results))
