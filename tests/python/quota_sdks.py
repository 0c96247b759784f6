"""Drives the official SDKs into the interceptor's quota rules and prints, as one JSON object, what
each SDK raised: its own exception class, the HTTP status, Retry-After, the rule header, and whether
a call after waiting Retry-After succeeded.

Usage: quota_sdks.py rate|denied|observe|stream  (the CA to trust comes from SSL_CERT_FILE)
"""
import json
import os
import ssl
import sys
import time

import anthropic
import openai

context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
ask = [{"role": "user", "content": "Say hello"}]
oai = openai.OpenAI(api_key="sk-test", http_client=openai.DefaultHttpxClient(verify=context), max_retries=0)
ant = anthropic.Anthropic(api_key="sk-ant-test", http_client=anthropic.DefaultHttpxClient(verify=context), max_retries=0)


def openai_call(model="gpt-4o-mini"):
    return oai.chat.completions.create(model=model, messages=ask, max_tokens=16)


def anthropic_call(model="claude-3-5-sonnet-latest"):
    return ant.messages.create(model=model, max_tokens=16, messages=ask)


def error_facts(error):
    headers = error.response.headers
    return {
        "class": f"{type(error).__module__.split('.')[0]}.{type(error).__name__}",
        "status": error.status_code,
        "retry_after": headers.get("retry-after"),
        "retry_after_ms": headers.get("retry-after-ms"),
        "rule": headers.get("x-interceptor-rule"),
        "body": error.body,
    }


def until_limited(call, limit_error, attempts=20):
    successes = 0
    for _ in range(attempts):
        try:
            call()
            successes += 1
        except limit_error as error:
            facts = error_facts(error)
            wait = float(facts["retry_after_ms"] or 1000 * float(facts["retry_after"])) / 1000
            time.sleep(wait + 0.3)
            call()
            facts["succeeded_after_wait"] = True
            facts["successes_before"] = successes
            return facts
    return {"successes_before": successes, "never_limited": True}


def denied(call, error_class):
    try:
        call()
        return {"allowed": True}
    except error_class as error:
        return error_facts(error)


def streamed(error_class, run):
    """Counts the text deltas of a stream and what ended it: completion or the SDK's own error."""
    deltas = 0
    try:
        for _ in run():
            deltas += 1
        return {"deltas": deltas, "completed": True}
    except error_class as error:
        return {"deltas": deltas, "class": f"{type(error).__module__.split('.')[0]}.{type(error).__name__}",
                "message": str(error)}


def openai_stream():
    for chunk in oai.chat.completions.create(model="long-stream", messages=ask, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk


def anthropic_stream():
    with ant.messages.stream(model="long-stream", max_tokens=4096, messages=ask) as stream:
        yield from stream.text_stream


results = {}
if sys.argv[1] == "rate":
    results["openai"] = until_limited(openai_call, openai.RateLimitError)
    results["anthropic"] = until_limited(anthropic_call, anthropic.RateLimitError)
elif sys.argv[1] == "denied":
    results["openai"] = denied(lambda: openai_call("o1-preview"), openai.NotFoundError)
    results["anthropic"] = denied(lambda: anthropic_call("claude-3-opus-20240229"), anthropic.NotFoundError)
    results["openai_allowed"] = openai_call().id
elif sys.argv[1] == "stream":
    results["openai"] = streamed(openai.APIError, openai_stream)
    results["anthropic"] = streamed(anthropic.APIError, anthropic_stream)
elif sys.argv[1] == "observe":
    results["ids"] = [openai_call().id for _ in range(3)]
print(json.dumps(results))
