"""Reads an SSE stream through the interceptor and prints the arrival time of each event (seconds)."""
import json
import os
import ssl
import sys
import time

import openai

url = sys.argv[1]
context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
arrivals = []
# The SDK's own HTTP client (httpx or its successor, whichever the pinned SDK ships).
with openai.DefaultHttpxClient(verify=context, timeout=60) as client:
    with client.stream("GET", url) as response:
        start = time.monotonic()
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
print(json.dumps({"status": response.status_code, "arrivals": arrivals}))
