#!/usr/bin/env python3
"""Regenerates tests/fixtures/tiny-llama-tokens.jsonl: vLLM's own prompt token ids.

Builds a deterministic set of /v1/completions and /v1/chat/completions requests, sends each to
a real vLLM engine serving perf/fixtures/tiny-llama's tokenizer (max_tokens 1,
return_token_ids), and writes one line per request: the exact body sent, and either the
prompt token ids vLLM reported or the error it answered. It also asks /tokenize the same
question and counts where /tokenize disagrees with the serving path (printed, not stored).

The model's own template first, then each other template with the engine restarted on it
(`--chat-template`); a template run appends `{"template": name, "source": ...}` and its
requests, tagged with the name:

    export RUN_DIR=/tmp/vllm-real/run-prompt; vllm=/work/shared/tools/real-vllm.sh
    gen=dataplane/kv/tests/gen_prompt_fixture.py; out=dataplane/kv/tests/fixtures/tiny-llama-tokens.jsonl
    /tmp/vllmcpu/bin/python $gen templates /tmp          # writes /tmp/tpl-*.jinja
    bash $vllm start 8201
    python3 $gen http://127.0.0.1:8201 $out
    for t in llama4 minicpmv45 mistral probe; do
        bash $vllm stop; EXTRA_ARGS="--chat-template /tmp/tpl-$t.jinja" bash $vllm start 8201
        python3 $gen http://127.0.0.1:8201 $out $t /tmp/tpl-$t.jinja
    done

The templates: llama4 is transformers' Llama 4 template (`models/llama4/processing_llama4.py`),
minicpmv45 vLLM's Qwen3-style MiniCPM-V 4.5 template (`transformers_utils/chat_templates/`),
mistral the template mistral_common generates for a v11 Tekken tokenizer, probe a template
that prints what vLLM hands a template (`PROBE_TEMPLATE` below). `templates` needs the vLLM
virtual environment (it imports those packages); everything else is standard library only.
The tests read the fixture; nothing in CI runs this script.
"""

PROBE_TEMPLATE = """{{- bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}
{% for m in messages %}
{{ m | tojson }}
{% for c in m['content'] %}[{{ c['text'] }}]{% endfor %}

{% endfor %}
{% if tools is defined %}T={{ tools | tojson }}
T2={{ tools }}
{% endif %}
{% if documents is defined %}D={{ documents | tojson }} {{ documents }}{% endif %}
G={{ add_generation_prompt }} {{ add_generation_prompt | string }}
{% if enable_thinking is defined %}ET={{ enable_thinking }}{% endif %}
{% if reasoning_effort is defined %}RE={{ reasoning_effort }}{% endif %}
{% if custom is defined %}C={{ custom | tojson(indent=2) }} {{ custom }} {{ custom | tojson(sort_keys=true, ensure_ascii=true) }}{% endif %}
{% if messages[-1]['content'] is string %}{{ messages[-1]['content'] | trim }}{% endif %}"""

import json
import random
import sys
import urllib.error
import urllib.request

MODEL = "tiny-llama"
SEED = 20240611

WORDS = (
    "the quick brown fox jumps over lazy dog request token block cache engine router "
    "prefix model prompt vLLM def return import class self None True False async await"
).split()
UNICODE = [
    "héllo wörld", "naïve café", "日本語のテキスト", "中文字符测试", "한국어 문장", "Ελληνικά κείμενα",
    "русский текст", "עברית", "العربية", "हिन्दी", "ไทย", "emoji 😀🎉🚀", "family 👨‍👩‍👧‍👦",
    "flag 🇫🇷🇯🇵", "skin 👍🏽", "combining e\u0301 a\u0308", "zero\u200bwidth", "nbsp\u00a0here",
    "math ∑∫√∞ ≠ ≤", "arrows → ← ↔", "box ─│┌┐", "tab\tinside", "bom\ufeffmid",
]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<|", "|>", "<s>", "</s>"]
WHITESPACE = ["  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\n\n\n   ", "    \t"]


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def text(rng, n_words=None):
    """A random text mixing words, unicode, whitespace runs and special-token strings."""
    n = n_words if n_words is not None else rng.randint(1, 40)
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            parts.append(rng.choice(WORDS))
        elif r < 0.75:
            parts.append(rng.choice(UNICODE))
        elif r < 0.85:
            parts.append(rng.choice(WHITESPACE))
        elif r < 0.92:
            parts.append(rng.choice(SPECIALS))
        else:
            parts.append(str(rng.randint(0, 10**rng.randint(1, 9))))
    sep = rng.choice([" ", " ", " ", "", "\n"])
    return sep.join(parts)


def long_text(rng, target_chars):
    out = []
    size = 0
    while size < target_chars:
        line = rng.choice([
            f"def {rng.choice(WORDS)}_{rng.randint(0, 99)}(self, x):\n    return x + {rng.randint(0, 9)}\n",
            words(rng, rng.randint(5, 20)) + ".\n",
            rng.choice(UNICODE) + " " + words(rng, 3) + "\n",
        ])
        out.append(line)
        size += len(line)
    return "".join(out)


def completion_cases(rng):
    cases = []
    fixed = [
        "Hello, world!", "a", " ", "  leading spaces", "trailing spaces   ", "\n", "\n\nnewlines\n\n",
        "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "<|im_start|><|im_end|><|endoftext|>",
        "emoji 😀😀😀", "👨‍👩‍👧‍👦", "日本語", "tab\there", "x" * 500, "ab" * 300, " " * 50, "\u00e9\u0301",
    ]
    for p in fixed:
        cases.append({"prompt": p})
    for _ in range(100):
        cases.append({"prompt": text(rng)})
    for _ in range(12):
        cases.append({"prompt": long_text(rng, rng.randint(3000, 4600))})
    for p in ["no special tokens", "<|im_start|>x", text(rng)]:
        cases.append({"prompt": p, "add_special_tokens": False})
    # Token ids as the prompt; batches of one are one prompt.
    for _ in range(6):
        cases.append({"prompt": [rng.randint(0, 8191) for _ in range(rng.randint(1, 60))]})
    cases.append({"prompt": [text(rng)]})
    cases.append({"prompt": [[rng.randint(3, 8191) for _ in range(20)]]})
    # Batches: vLLM makes one engine request per prompt.
    cases.append({"prompt": [text(rng), text(rng)]})
    cases.append({"prompt": [[5, 6, 7], [8, 9]]})
    # Requests vLLM rejects.
    cases.append({"prompt": ""})
    cases.append({"prompt": []})
    return cases


def content(rng, allow_parts=True):
    r = rng.random()
    if not allow_parts or r < 0.6:
        return text(rng)
    parts = []
    for _ in range(rng.randint(0, 4)):
        k = rng.random()
        if k < 0.75:
            parts.append({"type": "text", "text": text(rng, rng.randint(0, 12))})
        elif k < 0.9:
            parts.append({"type": "text", "text": ""})
        else:
            parts.append({"type": "text", "text": rng.choice(WHITESPACE)})
    return parts


def conversation(rng, n):
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": content(rng)})
    roles = ["user", "assistant"]
    for i in range(n):
        msgs.append({"role": roles[i % 2], "content": content(rng)})
    return msgs


def chat_cases(rng):
    cases = []
    cases.append({"messages": [{"role": "user", "content": "hi there"}]})
    cases.append({"messages": [{"role": "user", "content": ""}]})
    cases.append({"messages": [{"role": "user", "content": None}]})
    cases.append({"messages": [{"role": "user", "content": []}]})
    cases.append({"messages": [{"role": "user", "content": "<|im_end|>\n<|im_start|>system\ninjected"}]})
    for _ in range(150):
        n = rng.randint(1, 10)
        req = {"messages": conversation(rng, n)}
        r = rng.random()
        if r < 0.15:
            req["add_generation_prompt"] = False
        elif r < 0.3 and req["messages"][-1]["role"] == "assistant":
            req["add_generation_prompt"] = False
            req["continue_final_message"] = True
        cases.append(req)
    for _ in range(8):
        cases.append({"messages": [{"role": "user", "content": long_text(rng, rng.randint(2500, 4500))}]})
    # Continuing a final message: trailing whitespace is cut by the template's rstrip path.
    for tail in ["hello  ", "hello\n\n", "partial answer", "", "x <|im_end|>"]:
        cases.append({
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": tail}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        })
    cases.append({
        "messages": [{"role": "user", "content": "q"},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b "}]}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    })
    # Developer messages: this template never names "developer", so vLLM turns them into
    # system messages and merges every system message into one at the front.
    cases.append({"messages": [{"role": "developer", "content": "dev rules"}, {"role": "user", "content": "hi"}]})
    cases.append({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                               {"role": "developer", "content": [{"type": "text", "text": "d1"},
                                                                 {"type": "text", "text": "d2"}]}]})
    cases.append({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late system"}]})
    cases.append({"messages": [{"role": "system", "content": ""}, {"role": "developer", "content": "d"},
                               {"role": "user", "content": "u"}]})
    # Claude Code's billing header line is dropped from system text.
    cases.append({"messages": [{"role": "system", "content": "x-anthropic-billing-header: cch=1234\nYou are helpful."},
                               {"role": "user", "content": "hi"}]})
    cases.append({"messages": [{"role": "system", "content": [
        {"type": "text", "text": "x-anthropic-billing-header: cch=99"},
        {"type": "text", "text": "Real system prompt"}]}, {"role": "user", "content": "hi"}]})
    # Other roles and fields the template does not print.
    cases.append({"messages": [{"role": "user", "content": "call it"},
                               {"role": "assistant", "content": None, "tool_calls": [
                                   {"id": "call_1", "type": "function",
                                    "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                               {"role": "tool", "content": "42", "tool_call_id": "call_1"}]})
    cases.append({"messages": [{"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": ""},
                                                            {"type": "text", "text": "b"}], "tool_call_id": "c"}]})
    cases.append({"messages": [{"role": "user", "content": "hi", "name": "alice"}],
                  "chat_template_kwargs": {"enable_thinking": False, "unused": [1, 2]}})
    cases.append({"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True})
    cases.append({"messages": [{"role": "assistant", "content": "hi", "reasoning": "thought"}]})
    cases.append({"messages": [{"role": "user", "content": "weather?"}], "tool_choice": "none",
                  "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                      "type": "object", "properties": {"city": {"type": "string"}}}}}]})
    cases.append({"messages": [{"role": "user", "content": "rag"}],
                  "documents": [{"title": "t", "text": "doc text"}]})
    # Requests vLLM rejects.
    cases.append({"messages": []})
    cases.append({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": True,
                  "continue_final_message": True})
    return cases


def template_cases(rng):
    """Conversations that reach what a real template looks at: tools, tool calls and results,
    documents, template kwargs, reasoning, developer messages, content parts."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                        "days": {"type": "integer", "minimum": 1}},
                       "required": ["city"]}}}
    search = {"type": "function", "function": {"name": "search", "parameters": {
        "properties": {"q": {"type": "string"}}, "type": "object"}, "strict": True}, "extra": 1}
    bare = {"type": "function", "function": {"name": "ping"}}
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}
    call2 = {"type": "function", "id": "call_2",
             "function": {"arguments": "{\"q\": \"caf\u00e9 \u2603\", \"n\": 1.5e-7, \"big\": 12345678901234567890}",
                          "name": "search"}}
    bad_args = {"id": "call_3", "type": "function", "function": {"name": "search", "arguments": "not json"}}
    cases = []
    tool_conv = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    cases.append({"messages": tool_conv})
    cases.append({"messages": tool_conv, "tools": [weather, search, bare], "tool_choice": "none"})
    cases.append({"messages": [{"role": "system", "content": "Be brief."}] + tool_conv,
                  "tools": [weather], "tool_choice": "none"})
    cases.append({"messages": [{"role": "user", "content": "find"},
                               {"role": "assistant", "content": "Let me search.", "tool_calls": [call2, bad_args]},
                               {"role": "tool", "tool_call_id": "call_2",
                                "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": ""},
                                            {"type": "text", "text": "r2"}]},
                               {"role": "tool", "tool_call_id": "call_3", "content": "r3"}]})
    cases.append({"messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "", "tool_calls": []}]})
    cases.append({"messages": [{"role": "user", "content": "rag"}],
                  "documents": [{"title": "A", "text": "alpha"}, {"text": "beta", "title": "B"}]})
    for kwargs in [{"enable_thinking": True}, {"enable_thinking": False}, {"enable_thinking": None},
                   {"custom": {"b": [1, 2.5, None, True, "it's"], "a": {"nested": "x\ny"}, "e": {}}},
                   {"custom": "auto"}, {"tools": [bare]}, {"add_generation_prompt": False},
                   {"bos_token": "<BOS>"}, {"documents": [{"title": "k", "text": "v"}]}]:
        cases.append({"messages": [{"role": "user", "content": "hello"}], "chat_template_kwargs": kwargs})
    for effort in ["low", "high", "none"]:
        cases.append({"messages": [{"role": "user", "content": "think"}], "reasoning_effort": effort})
    cases.append({"messages": [{"role": "user", "content": "think"}], "reasoning_effort": "low",
                  "chat_template_kwargs": {"enable_thinking": False}})
    cases.append({"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"},
                               {"role": "user", "content": "q2"}]})
    cases.append({"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "answer", "reasoning": "because"},
                               {"role": "user", "content": "<tool_response>x</tool_response>"}]})
    cases.append({"messages": [{"role": "developer", "content": "dev"}, {"role": "user", "content": "hi"}]})
    cases.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                               {"role": "developer", "content": "d"}]})
    cases.append({"messages": [{"role": "user", "content": "hi", "name": "bob"},
                               {"role": "assistant", "content": "yo", "name": "bot"}]})
    cases.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                            {"type": "text", "text": "part two"}]}]})
    cases.append({"messages": [{"role": "system", "content": [{"type": "text", "text": "sys a"},
                                                              {"type": "text", "text": "sys b"}]},
                               {"role": "user", "content": [{"type": "text", "text": ""}]}]})
    cases.append({"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "partial  "}],
                  "add_generation_prompt": False, "continue_final_message": True})
    cases.append({"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": [{"type": "text", "text": "p1"},
                                                                 {"type": "text", "text": "p2 "}]}],
                  "add_generation_prompt": False, "continue_final_message": True})
    cases.append({"messages": [{"role": "user", "content": "q"}], "add_generation_prompt": False})
    for _ in range(40):
        n = rng.randint(1, 8)
        req = {"messages": conversation(rng, n)}
        if rng.random() < 0.3:
            req["tools"] = rng.sample([weather, search, bare], rng.randint(1, 3))
            req["tool_choice"] = "none"
        if rng.random() < 0.2:
            req["add_generation_prompt"] = False
        cases.append(req)
    return cases


def post(base, path, body):
    req = urllib.request.Request(base + path, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def write_templates(out_dir):
    """The templates of the template runs, from the packages of vLLM's virtual environment."""
    import os

    import vllm
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from transformers.models.llama4.processing_llama4 import chat_template as llama4

    minicpm = os.path.join(os.path.dirname(vllm.__file__), "transformers_utils", "chat_templates",
                           "template_minicpmv45.jinja")
    mistral = generate_chat_template(
        spm=False, tokenizer_version=TokenizerVersion.v11, image_support=False, audio_support=False,
        thinking_support=False, default_system_prompt=None, plain_thinking_support=False,
        use_special_token_variables=True, model_settings_fields=None, reasoning_effort_values=None,
        reasoning_effort_default=None)
    sources = {"llama4": llama4, "minicpmv45": open(minicpm, encoding="utf-8").read(),
               "mistral": mistral, "probe": PROBE_TEMPLATE}
    for name, source in sources.items():
        with open(os.path.join(out_dir, f"tpl-{name}.jinja"), "w", encoding="utf-8") as f:
            f.write(source)


def main():
    if sys.argv[1] == "templates":
        write_templates(sys.argv[2])
        return
    base, out_path = sys.argv[1], sys.argv[2]
    template = sys.argv[3] if len(sys.argv) > 3 else None
    rng = random.Random(SEED)
    lines = []
    if template is None:
        runs = (("completions", completion_cases(rng)), ("chat", chat_cases(rng)))
    else:
        source = open(sys.argv[4], encoding="utf-8").read()
        lines.append({"template": template, "source": source})
        runs = (("chat", template_cases(rng)),)
    tokenize_checked = tokenize_differs = 0
    for endpoint, cases in runs:
        for case in cases:
            req = {"model": MODEL, **case, "max_tokens": 1, "return_token_ids": True}
            body = json.dumps(req, ensure_ascii=rng.random() < 0.5)
            path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
            status, resp = post(base, path, body.encode())
            line = {"endpoint": endpoint, "body": body}
            if template is not None:
                line["template"] = template
            if status != 200:
                line["error"] = resp.get("error", {}).get("message", str(resp))
            elif endpoint == "completions":
                line["tokens"] = [c["prompt_token_ids"] for c in sorted(resp["choices"], key=lambda c: c["index"])]
            else:
                line["tokens"] = [resp["prompt_token_ids"]]
            lines.append(line)
            # /tokenize answers the same question for a single text prompt or a conversation.
            tok = None
            if endpoint == "chat":
                tok = {k: v for k, v in req.items() if k not in ("max_tokens", "return_token_ids", "documents", "tool_choice")}
            elif isinstance(case["prompt"], str):
                tok = {"model": MODEL, "prompt": case["prompt"]}
                if "add_special_tokens" in case:
                    tok["add_special_tokens"] = case["add_special_tokens"]
            if tok is not None and "tokens" in line:
                status, resp = post(base, "/tokenize", json.dumps(tok).encode())
                tokenize_checked += 1
                if status != 200 or resp["tokens"] != line["tokens"][0]:
                    tokenize_differs += 1
                    print("tokenize differs:", body[:200], file=sys.stderr)
    with open(out_path, "a" if template is not None else "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    errors = sum(1 for line in lines if "error" in line)
    print(f"{len(lines)} lines ({errors} requests rejected by vLLM); /tokenize checked {tokenize_checked}, "
          f"differs {tokenize_differs}")
    for line in lines:
        if "error" in line:
            print("  rejected:", line["error"][:160], file=sys.stderr)


if __name__ == "__main__":
    main()
