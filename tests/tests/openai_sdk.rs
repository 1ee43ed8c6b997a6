//! The official OpenAI Python SDK, unchanged, through lmstack to simulated engines.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use lmstack_e2e::*;

const SCRIPT: &str = r#"
import sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert models == ["sim-model"], models

c = client.completions.create(model="sim-model", prompt="Say this is a test", max_tokens=7)
assert c.object == "text_completion", c
assert c.usage.completion_tokens == 7, c.usage
assert len(c.choices[0].text.split()) == 7, c

chat = client.chat.completions.create(
    model="sim-model",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    max_tokens=5,
)
assert chat.choices[0].message.role == "assistant", chat
assert chat.usage.completion_tokens == 5

pieces = []
usage = None
for chunk in client.chat.completions.create(
    model="sim-model",
    messages=[{"role": "user", "content": "stream please"}],
    max_tokens=6,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
assert len(pieces) == 6, pieces
assert usage is not None and usage.completion_tokens == 6, usage

texts = []
for chunk in client.completions.create(model="sim-model", prompt="count", max_tokens=4, stream=True):
    texts.append(chunk.choices[0].text)
assert len(texts) == 4, texts

emb = client.embeddings.create(model="sim-model", input=["one", "two"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 32

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise SystemExit("expected a NotFoundError")
except Exception as e:
    import openai
    assert isinstance(e, openai.NotFoundError), repr(e)
    assert "no-such-model" in str(e)

print("OK")
"#;

#[test]
fn the_openai_python_sdk_works_unchanged() {
    let python = python_with_openai();
    let e1 = sim("e1", &[]);
    let e2 = sim("e2", &[]);
    let r = router(&backends(&[&e1, &e2]));
    wait_healthy(&r);
    python_says_ok(&python, SCRIPT, &[&r.url()]);
}
