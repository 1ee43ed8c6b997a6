"""Agreement between lmstack's exact KV lookup and what real vLLM engines report storing.

Run by `cargo xtask real-kv` with the vLLM venv's Python (pyzmq and msgspec come with vLLM):

    python real_kv_agreement.py ROUTER_URL MODEL N ENGINE_URL=KV_ENDPOINT ...

For each of N requests (completions and chat, many sharing a document or a conversation's
history with earlier ones), it
1. drains every engine's KV events (ZeroMQ SUB, decoded by msgspec, independently of
   lmstack), keeping per engine the token prefixes of the blocks it holds now;
2. asks the engine for the request's token ids (vLLM's own /tokenize, same rendering as the
   serving path);
3. sends the request through lmstack with `--explain-routing` and reads `kv_held`, the
   blocks lmstack's lookup found on each engine (pool order = the engines' order here);
4. compares, per engine, with the leading blocks of those token ids the engine reported
   storing (and not removing).
Prints one JSON line: totals, agreements, and the first disagreements.
"""

import json
import sys
import time
import urllib.request

import msgspec
import zmq

router, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
engines = [a.split("=", 1) for a in sys.argv[4:]]


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=120) as r:
        return dict(r.headers), json.loads(r.read())


ctx = zmq.Context()
subs = []
for url, endpoint in engines:
    s = ctx.socket(zmq.SUB)
    s.connect(endpoint)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    subs.append(s)
time.sleep(0.5)

# Per engine: vLLM block hash -> the token prefix up to and including that block.
prefixes = [dict() for _ in engines]
block_size = [None for _ in engines]
events_seen = [0 for _ in engines]


def field(ev, name, pos):
    if isinstance(ev, dict):
        return ev.get(name)
    return ev[pos] if len(ev) > pos else None


def apply(i, payload):
    ts, events, *_ = msgspec.msgpack.decode(payload)
    for ev in events:
        kind = ev.get("type") if isinstance(ev, dict) else ev[0]
        events_seen[i] += 1
        if kind == "BlockStored":
            hashes = field(ev, "block_hashes", 1)
            parent = field(ev, "parent_block_hash", 2)
            tokens = field(ev, "token_ids", 3)
            bs = field(ev, "block_size", 4)
            medium = field(ev, "medium", 6)
            if medium not in (None, "GPU"):
                continue
            block_size[i] = bs
            base = () if parent is None else prefixes[i].get(parent)
            if base is None:
                continue
            for j, h in enumerate(hashes):
                base = base + tuple(tokens[j * bs:(j + 1) * bs])
                prefixes[i][h] = base
        elif kind == "BlockRemoved":
            if field(ev, "medium", 2) not in (None, "GPU"):
                continue
            for h in field(ev, "block_hashes", 1):
                prefixes[i].pop(h, None)
        elif kind == "AllBlocksCleared":
            prefixes[i].clear()


def drain(quiet_s=0.15):
    """Applies events until no engine has published for `quiet_s`."""
    poller = zmq.Poller()
    for s in subs:
        poller.register(s, zmq.POLLIN)
    while True:
        ready = dict(poller.poll(int(quiet_s * 1000)))
        if not ready:
            return
        for i, s in enumerate(subs):
            while s in ready:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                apply(i, frames[-1])


def held(i, tokens):
    bs = block_size[i]
    if not bs:
        return 0
    present = set(prefixes[i].values())
    k = 0
    while (k + 1) * bs <= len(tokens) and tuple(tokens[:(k + 1) * bs]) in present:
        k += 1
    return k


WORDS = ("engine cache block token prefix router replica latency queue batch model prompt "
         "history answer question document section figure report").split()


def text(seed, words):
    return " ".join(WORDS[(seed * 7 + j * j + j // 3) % len(WORDS)] + str((seed + j) % 97) for j in range(words))


docs = [text(d, 220) for d in range(12)]
results = {"requests": 0, "checks": 0, "agree": 0, "nonzero_checks": 0, "nonzero_agree": 0,
           "completions": 0, "chats": 0, "disagreements": []}
conversations = {}
for r in range(n):
    c = r % 60  # 60 conversations, interleaved
    chat = c % 2 == 1
    turn = conversations.get(c, 0)
    conversations[c] = turn + 1
    doc = docs[c % len(docs)]
    if chat:
        messages = [{"role": "system", "content": "You answer questions about documents."},
                    {"role": "user", "content": f"Document:\n{doc}\nConversation {c}: {text(c, 30)}"}]
        for t in range(turn):
            messages.append({"role": "assistant", "content": f"Answer {t} for {c}: {text(c + t, 12)}"})
            messages.append({"role": "user", "content": f"Follow-up {t}: {text(c * t + 1, 10)}"})
        body = {"model": model, "messages": messages, "max_tokens": 2, "ignore_eos": True}
        tok_body = {"model": model, "messages": messages, "add_generation_prompt": True}
        path = "/v1/chat/completions"
    else:
        prompt = f"{doc}\nReader {c}: {text(c, 30)}" + "".join(
            f"\nQ{t}: {text(c * 3 + t, 10)}\nA{t}: {text(c + t, 12)}" for t in range(turn + 1))
        body = {"model": model, "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
        tok_body = {"model": model, "prompt": prompt}
        path = "/v1/completions"
    drain()
    _, tok = post(engines[0][0] + "/tokenize", tok_body)
    tokens = tok["tokens"]
    expected = [held(i, tokens) for i in range(len(engines))]
    headers, _ = post(router + path, body)
    route = dict(kv.split("=", 1) for kv in headers.get("x-lmstack-route", headers.get("X-Lmstack-Route", "")).split("; ") if "=" in kv)
    got = route.get("kv_held", "").split(",")
    results["requests"] += 1
    results["chats" if chat else "completions"] += 1
    for i, e in enumerate(expected):
        results["checks"] += 1
        g = got[i] if i < len(got) else "?"
        ok = g == str(e)
        results["agree"] += ok
        if e > 0:
            results["nonzero_checks"] += 1
            results["nonzero_agree"] += ok
        if not ok and len(results["disagreements"]) < 10:
            results["disagreements"].append({"request": r, "engine": i, "router": g, "engine_reported": e,
                                             "tokens": len(tokens), "route": headers.get("x-lmstack-route")})
drain()
results["events_seen"] = events_seen
results["block_size"] = block_size
print(json.dumps(results))
