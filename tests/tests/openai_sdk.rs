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

const AUDIO: &str = r#"
import sys
import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
audio = bytes(range(256)) * 400

# Each model lives on its own engine: the form's `model` field decides where it goes.
for model, engine in [("whisper-a", "ea"), ("whisper-b", "eb")]:
    t = client.audio.transcriptions.create(model=model, file=("speech.wav", audio, "audio/wav"))
    assert t.text == f"{len(audio)} bytes of audio heard by {engine}", t
    t = client.audio.translations.create(model=model, file=("speech.wav", audio, "audio/wav"))
    assert t.text.endswith(f"heard by {engine}"), t

try:
    client.audio.transcriptions.create(model="no-such-model", file=("speech.wav", audio, "audio/wav"))
    raise SystemExit("expected a NotFoundError")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e
print("OK")
"#;

#[test]
fn audio_forms_and_invocations_go_to_the_engine_of_their_model() {
    let python = python_with_openai();
    let a = sim("ea", &["--model", "whisper-a"]);
    let b = sim("eb", &["--model", "whisper-b", "--lora", "whisper-b-medical"]);
    let r = router(&backends(&[&a, &b]));
    wait_healthy(&r);
    wait_until("both engines' models discovered", || {
        get(&r, "/v1/models").json()["data"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    python_says_ok(&python, AUDIO, &[&r.url()]);

    // A form without a model is the client's error, named like a JSON body's.
    let boundary = "xYzZy";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--{boundary}--\r\n"
    );
    let reply = agent()
        .post(format!("{}/v1/audio/transcriptions", r.url()))
        .header("content-type", &format!("multipart/form-data; boundary={boundary}"))
        .send(&form)
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = serde_json::from_str(&reply.into_body().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"]["param"], "model", "{body}");

    // SageMaker's `/invocations`: by the body's model, or the adapter its header names.
    let chat =
        serde_json::json!({"model": "whisper-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let reply = post(&r, "/invocations", &chat, &[]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sim-engine"), Some("eb"));
    assert_eq!(reply.json()["object"], "chat.completion");
    let completion = serde_json::json!({"prompt": "hi", "max_tokens": 2});
    let reply = post(
        &r,
        "/invocations",
        &completion,
        &[("X-Amzn-SageMaker-Adapter-Identifier", "whisper-b-medical")],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-sim-engine"), Some("eb"));
    assert_eq!(reply.json()["model"], "whisper-b-medical");
}
