//! Token-exact prompts: the token ids a vLLM engine computes for a request, reproduced from the
//! model's own `tokenizer.json`, `tokenizer_config.json` and chat template.
//!
//! The router keys a request's blocks by these ids and matches them against the blocks engines
//! report caching, so they must be exactly vLLM's (0.32, Hugging Face tokenizer, transformers 5):
//! - `/v1/completions`: a text prompt is encoded with special tokens unless the request says
//!   `add_special_tokens: false`; token ids are taken as they are; a list is a batch
//!   (`renderers/inputs/preprocess.py` `prompt_to_seq`, `entrypoints/openai/completion/protocol.py`).
//! - `/v1/chat/completions`: messages are normalised as vLLM's `parse_chat_messages` does
//!   (`renderers/chat_utils.py`), rendered with the chat template configured like transformers'
//!   sandboxed Jinja environment (`transformers/utils/chat_template_utils.py`), with the template
//!   kwargs merged as `ChatParams` does (`renderers/params.py`, `renderers/hf.py`), and the
//!   rendered text is encoded without special tokens unless the request asks for them.
//!
//! Whatever this module cannot reproduce exactly is a [`PromptError`], never a different token
//! list: images and other non-text parts, per-request templates, truncation, suffix (FIM),
//! prompt embeddings, template constructs minijinja evaluates differently from Jinja2. The
//! router then routes that request approximately. Two inputs are outside the request: a
//! template's `strftime_now` reads this process's clock in UTC (vLLM's, in the engine's local
//! time), and a template that prints a list or dict gets Python's `repr`, which this module
//! knows for characters assigned by Unicode 14 (others are an error).
//!
//! It is deliberately not a tokenizer service: no IO besides reading the model directory once,
//! no Mistral (`tekken.json`) tokenizers or other vLLM renderers than the Hugging Face one, no
//! multimodal processors, and it assumes the engine runs with vLLM's defaults for
//! `--tokenizer-mode`, `--chat-template`, `--chat-template-content-format`,
//! `--default-chat-template-kwargs`, `--trust-request-chat-template` and
//! `--exclude-tools-when-tool-choice-none`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::machinery::ast;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Why no exact token list could be computed: the router routes such a request approximately.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A model file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A model file is not one this module can load the way vLLM does.
    #[error("cannot use {path}: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer failed on a text.
    #[error("tokenizer failed")]
    Tokenizer(#[source] tokenizers::Error),
    /// The model has no chat template this module can render.
    #[error("no usable chat template: {0}")]
    NoTemplate(String),
    /// The chat template failed: it raised an exception, or used something minijinja does not
    /// evaluate as Jinja2 does.
    #[error("chat template failed")]
    Render(#[source] Error),
    /// vLLM answers this request with an error, so it has no prompt tokens.
    #[error("vLLM rejects this request: {0}")]
    Rejected(String),
    /// vLLM accepts this request, but its tokens cannot be reproduced exactly here.
    #[error("not reproducible: {0}")]
    Unsupported(String),
    /// A `/v1/completions` batch: vLLM runs one engine request per prompt, see
    /// [`PromptTokenizer::completion_batch`].
    #[error("a batch of {0} prompts")]
    Batch(usize),
}

fn rejected(reason: impl Into<String>) -> PromptError {
    PromptError::Rejected(reason.into())
}

fn unsupported(reason: impl Into<String>) -> PromptError {
    PromptError::Unsupported(reason.into())
}

/// A model's tokenizer and chat template, loaded once; computes the prompt token ids of
/// `/v1/completions` and `/v1/chat/completions` request bodies exactly as vLLM does.
///
/// Load it once per model and share it (`Arc`) across workers: all methods take `&self`.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    templates: Templates,
    /// transformers' `special_tokens_map`: template variables such as `bos_token`.
    special_tokens: Vec<(String, String)>,
}

/// The chat templates of a model, as transformers' `get_chat_template` chooses among them.
enum Templates {
    /// No template, or one that cannot be used here (the reason).
    None(String),
    /// `tokenizer.chat_template` is one string.
    Single(Box<ChatTemplate>),
    /// Named templates: `default`, and `tool_use` when the request has tools.
    Named(Vec<(String, ChatTemplate)>),
}

struct ChatTemplate {
    /// Compiled, or why minijinja cannot compile it.
    env: Result<Environment<'static>, String>,
    source: String,
    content_format: ContentFormat,
}

/// How vLLM passes message content to a template (`_detect_content_format` in `renderers/hf.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentFormat {
    /// Text parts are joined with "\n" into one string.
    String,
    /// Content is a list of `{"type": "text", "text": ...}` parts.
    OpenAi,
}

const TEMPLATE_NAME: &str = "chat_template";
/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
const NAMED_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
/// Tokenizer classes for which transformers 5 takes `tokenizer.json` as it is. Model-specific
/// classes (`LlamaTokenizer`, `Qwen2Tokenizer`, ...) rebuild the pre-tokenizer and decoder from
/// their own code and only read the vocabulary from the file.
const GENERIC_TOKENIZER_CLASSES: [&str; 2] = ["TokenizersBackend", "PreTrainedTokenizerFast"];
/// Model types whose tokenizer transformers 5 builds with a model-specific class whatever
/// `tokenizer_class` says (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` with a class of their own).
const MODEL_TYPES_WITH_OWN_TOKENIZER: [&str; 6] = [
    "hyperclovax_vision_v2",
    "qwen2",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen4_exp",
];
/// Files that make vLLM look for an AutoProcessor chat template first.
const PROCESSOR_FILES: [&str; 4] = [
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
];

impl PromptTokenizer {
    /// Loads a model directory as vLLM's Hugging Face tokenizer does: `tokenizer.json`, the
    /// special tokens and flags of `tokenizer_config.json` (and `special_tokens_map.json`), and the
    /// chat template from `chat_template.jinja` and `additional_chat_templates/*.jinja`, or else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`).
    ///
    /// Refuses tokenizers transformers would not build from `tokenizer.json` alone (no or a
    /// model-specific `tokenizer_class`, a model type transformers gives its own class, custom
    /// code): [`Self::from_files`] trusts the file.
    /// A directory with a multimodal processor config loads, but its chat requests are
    /// [`PromptError::NoTemplate`].
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, PromptError> {
        let dir = dir.as_ref();
        // vLLM's `auto` tokenizer mode takes Mistral's own tokenizer where it finds one.
        let mistral = std::fs::read_dir(dir)
            .map_err(|source| PromptError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .find(|name| name == "tekken.json" || name.starts_with("tokenizer.model.v"));
        if let Some(name) = mistral {
            return Err(PromptError::Model {
                path: dir.join(name),
                reason: "vLLM may use Mistral's tokenizer and renderer for this model".into(),
            });
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = match read_optional(&config_path)? {
            Some(text) => parse_file_json(&config_path, &text)?,
            None => Json::Object(Vec::new()),
        };
        let class = config.get("tokenizer_class").and_then(Json::as_str);
        if !class.is_some_and(|c| GENERIC_TOKENIZER_CLASSES.contains(&c)) {
            return Err(PromptError::Model {
                path: config_path,
                reason: format!(
                    "tokenizer_class {} is built by transformers' own code, not read from \
                     tokenizer.json; use PromptTokenizer::from_files to trust tokenizer.json",
                    class.unwrap_or("(none)")
                ),
            });
        }
        // transformers overrides the declared class for a few model types.
        let model_config = dir.join("config.json");
        if let Some(text) = read_optional(&model_config)? {
            let model_type = parse_file_json(&model_config, &text)?
                .get("model_type")
                .and_then(Json::as_str)
                .map(str::to_string);
            if let Some(model_type) = model_type.filter(|t| MODEL_TYPES_WITH_OWN_TOKENIZER.contains(&t.as_str())) {
                return Err(PromptError::Model {
                    path: model_config,
                    reason: format!("transformers builds model_type {model_type}'s tokenizer with its own code"),
                });
            }
        }
        if config.get("auto_map").is_some() {
            return Err(PromptError::Model {
                path: config_path,
                reason: "auto_map: the tokenizer is custom code".into(),
            });
        }
        let mut special = SpecialTokens::from_config(&config);
        if config.get("added_tokens_decoder").is_none() {
            let path = dir.join("special_tokens_map.json");
            if let Some(text) = read_optional(&path)? {
                special.merge_legacy_map(&parse_file_json(&path, &text)?);
            }
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = load_tokenizer(&tokenizer_path)?;
        apply_transformers_init(&mut tokenizer, &config, &special).map_err(|reason| PromptError::Model {
            path: tokenizer_path.clone(),
            reason,
        })?;

        let templates = if let Some(file) = PROCESSOR_FILES.iter().find(|f| dir.join(f).exists()) {
            Templates::None(format!("{file}: vLLM may take a multimodal processor's template"))
        } else {
            load_templates(dir, &config)?
        };
        Ok(Self {
            tokenizer,
            templates,
            special_tokens: special.named,
        })
    }

    /// Loads `tokenizer.json` as it is and an optional chat template (Jinja source), with no
    /// special-token variables: for a model whose tokenizer class [`Self::from_dir`] refuses,
    /// when the caller vouches that `tokenizer.json` is what the engine runs.
    pub fn from_files(tokenizer_json: impl AsRef<Path>, template: Option<String>) -> Result<Self, PromptError> {
        let mut tokenizer = load_tokenizer(tokenizer_json.as_ref())?;
        apply_transformers_init(&mut tokenizer, &Json::Object(Vec::new()), &SpecialTokens::default()).map_err(
            |reason| PromptError::Model {
                path: tokenizer_json.as_ref().to_path_buf(),
                reason,
            },
        )?;
        let templates = match template {
            Some(source) => Templates::Single(Box::new(ChatTemplate::new(normalize_newlines(&source)))),
            None => Templates::None("no chat template given".into()),
        };
        Ok(Self {
            tokenizer,
            templates,
            special_tokens: Vec::new(),
        })
    }

    /// Encodes a text as vLLM's renderer does (`tokenizer(text, add_special_tokens=...)`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(PromptError::Tokenizer)
    }

    /// The prompt token ids of a `/v1/completions` request body (raw JSON) with one prompt: a
    /// string, token ids, or a list holding one of those.
    ///
    /// A list of several prompts is [`PromptError::Batch`]: vLLM runs each as its own engine
    /// request, so there is no single prefix to route on; see [`Self::completion_batch`].
    pub fn completion(&self, body: &[u8]) -> Result<Vec<u32>, PromptError> {
        let mut prompts = self.completion_batch(body)?;
        match prompts.len() {
            1 => Ok(prompts.remove(0)),
            n => Err(PromptError::Batch(n)),
        }
    }

    /// The prompt token ids of every prompt of a `/v1/completions` request body, in order: one
    /// entry per engine request vLLM makes (`prompt_to_seq`).
    pub fn completion_batch(&self, body: &[u8]) -> Result<Vec<Vec<u32>>, PromptError> {
        let request = Json::parse_body(body)?;
        for field in ["suffix", "prompt_embeds", "truncate_prompt_tokens"] {
            if request.get(field).is_some_and(|v| !v.is_null()) {
                return Err(unsupported(format!("`{field}` is set")));
            }
        }
        let add_special_tokens = request.bool_field("add_special_tokens", true)?;
        let prompts = match request.get("prompt") {
            None | Some(Json::Null) => return Err(rejected("no prompt")),
            Some(Json::Str(text)) => vec![Prompt::Text(text)],
            Some(Json::Array(items)) if !items.is_empty() && items.iter().all(Json::is_int) => {
                vec![Prompt::Ids(items)]
            }
            Some(Json::Array(items)) if items.is_empty() => {
                return Err(rejected("an empty prompt list"));
            }
            // A batch: all texts, or all token id lists.
            Some(Json::Array(items)) if items.iter().all(|i| matches!(i, Json::Str(_))) => {
                items.iter().filter_map(|i| i.as_str().map(Prompt::Text)).collect()
            }
            Some(Json::Array(items))
                if items
                    .iter()
                    .all(|i| matches!(i, Json::Array(ids) if ids.iter().all(Json::is_int))) =>
            {
                items
                    .iter()
                    .filter_map(|i| match i {
                        Json::Array(ids) => Some(Prompt::Ids(ids)),
                        _ => None,
                    })
                    .collect()
            }
            Some(_) => return Err(rejected("`prompt` is not text or token ids")),
        };
        prompts
            .into_iter()
            .map(|prompt| match prompt {
                Prompt::Text("") | Prompt::Ids([]) => Err(rejected("an empty prompt")),
                Prompt::Text(text) => self.encode(text, add_special_tokens),
                Prompt::Ids(ids) => token_ids(ids),
            })
            .collect()
    }

    /// The prompt token ids of a `/v1/chat/completions` request body (raw JSON, whose key order
    /// templates can see): the rendered chat template, encoded as vLLM does.
    pub fn chat(&self, body: &[u8]) -> Result<Vec<u32>, PromptError> {
        let request = Json::parse_body(body)?;
        let add_special_tokens = request.bool_field("add_special_tokens", false)?;
        match self.render_request(&request)? {
            Rendered::Text(text) => self.encode(&text, add_special_tokens),
            Rendered::Ids(ids) => Ok(ids),
        }
    }

    /// The text the chat template renders for a `/v1/chat/completions` request body, before
    /// tokenization (vLLM's `prompt_text`).
    pub fn render_chat(&self, body: &[u8]) -> Result<String, PromptError> {
        match self.render_request(&Json::parse_body(body)?)? {
            Rendered::Text(text) => Ok(text),
            Rendered::Ids(_) => Err(unsupported("kv_transfer_params carries prompt token ids, not text")),
        }
    }

    fn render_request(&self, request: &Json) -> Result<Rendered, PromptError> {
        for field in ["chat_template", "truncate_prompt_tokens"] {
            if request.get(field).is_some_and(|v| !v.is_null()) {
                return Err(unsupported(format!("`{field}` is set")));
            }
        }
        let Some(Json::Array(messages)) = request.get("messages") else {
            return Err(rejected("`messages` is not a list"));
        };
        // Disaggregated serving: the prefill stage's ids, reused as they are
        // (`_reused_prompt_token_ids` in `renderers/online_renderer.py`).
        if let Some(ids) = request
            .get("kv_transfer_params")
            .and_then(|kv| kv.get("prompt_token_ids"))
            .filter(|ids| !ids.is_null())
            && !request.bool_field("echo", false)?
        {
            return match ids {
                Json::Array(ids) if !ids.is_empty() => token_ids(ids).map(Rendered::Ids),
                _ => Err(rejected("kv_transfer_params.prompt_token_ids is not a list of ids")),
            };
        }
        let add_generation_prompt = request.bool_field("add_generation_prompt", true)?;
        let continue_final_message = request.bool_field("continue_final_message", false)?;
        if add_generation_prompt && continue_final_message {
            return Err(rejected("both continue_final_message and add_generation_prompt"));
        }
        let kwargs = template_kwargs(request, add_generation_prompt, continue_final_message)?;
        let tools = kwargs.iter().find(|(k, _)| k == "tools").map(|(_, v)| v);
        let template = self.template(tools.is_some())?;
        let env = template
            .env
            .as_ref()
            .map_err(|reason| PromptError::NoTemplate(reason.clone()))?;

        let mut conversation = messages
            .iter()
            .map(|message| conversation_message(message, template.content_format))
            .collect::<Result<Vec<_>, _>>()?;
        if conversation.is_empty() {
            return Err(rejected("an empty conversation"));
        }
        if conversation.iter().any(|m| m.role == "developer")
            && !template.source.contains("\"developer\"")
            && !template.source.contains("'developer'")
        {
            conversation = developer_to_system(conversation);
        }

        // transformers' `render_jinja_template`: mark the end of the final message, render, cut there.
        let mut final_text = None;
        if continue_final_message {
            if !template.source.contains("content") {
                return Err(rejected("the template has no `content` to continue"));
            }
            let last = conversation.last_mut().ok_or_else(|| rejected("no messages"))?;
            final_text = Some(last.mark_continuation()?);
        }

        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        let mut set = |key: &str, value: Value| match context.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => context.push((key.to_string(), value)),
        };
        set(
            "messages",
            Value::from(conversation.iter().map(Message::to_value).collect::<Vec<_>>()),
        );
        set("tools", tools.map_or(Value::from(()), Json::to_value));
        let documents = kwargs.iter().find(|(k, _)| k == "documents").map(|(_, v)| v);
        set("documents", documents.map_or(Value::from(()), Json::to_value));
        set("add_generation_prompt", Value::from(add_generation_prompt));
        for (key, value) in &kwargs {
            if !matches!(
                key.as_str(),
                "tools" | "documents" | "add_generation_prompt" | "continue_final_message"
            ) {
                set(key, value.to_value());
            }
        }
        let rendered = env
            .get_template(TEMPLATE_NAME)
            .and_then(|t| t.render(Value::from_pairs(context)))
            .map_err(PromptError::Render)?;

        match final_text {
            None => Ok(Rendered::Text(rendered)),
            Some(final_text) => cut_at_continuation(rendered, &final_text).map(Rendered::Text),
        }
    }

    fn template(&self, has_tools: bool) -> Result<&ChatTemplate, PromptError> {
        match &self.templates {
            Templates::None(reason) => Err(PromptError::NoTemplate(reason.clone())),
            Templates::Single(template) => Ok(template),
            Templates::Named(named) => {
                let pick = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t);
                has_tools
                    .then(|| pick("tool_use"))
                    .flatten()
                    .or_else(|| pick("default"))
                    .ok_or_else(|| rejected("several chat templates and no `default`"))
            }
        }
    }
}

enum Prompt<'a> {
    Text(&'a str),
    Ids(&'a [Json]),
}

enum Rendered {
    Text(String),
    Ids(Vec<u32>),
}

fn token_ids(ids: &[Json]) -> Result<Vec<u32>, PromptError> {
    ids.iter()
        .map(|id| match id {
            Json::Int(id) => u32::try_from(*id).map_err(|_| rejected("a token id out of range")),
            _ => Err(rejected("a token id is not an integer")),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Loading

fn read_optional(path: &Path) -> Result<Option<String>, PromptError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PromptError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_file_json(path: &Path, text: &str) -> Result<Json, PromptError> {
    Json::parse_str(text).map_err(|reason| PromptError::Model {
        path: path.to_path_buf(),
        reason,
    })
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, PromptError> {
    let bytes = std::fs::read(path).map_err(|source| PromptError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|err| PromptError::Model {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    // transformers sets truncation and padding on every call; vLLM's calls truncate only past
    // max_model_len + 1, which the engine then rejects anyway.
    tokenizer.with_truncation(None).map_err(|err| PromptError::Model {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Python's `open(...).read()`: universal newlines.
fn normalize_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

fn load_templates(dir: &Path, config: &Json) -> Result<Templates, PromptError> {
    // Template files, when there are any, replace the config's templates.
    let mut files = Vec::new();
    if let Some(text) = read_optional(&dir.join("chat_template.jinja"))? {
        files.push(("default".to_string(), normalize_newlines(&text)));
    }
    let extra_dir = dir.join("additional_chat_templates");
    if extra_dir.is_dir() {
        let entries = std::fs::read_dir(&extra_dir).map_err(|source| PromptError::Read {
            path: extra_dir.clone(),
            source,
        })?;
        let mut paths = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
            .collect::<Vec<_>>();
        paths.sort();
        for path in paths {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(text) = read_optional(&path)? {
                files.push((name, normalize_newlines(&text)));
            }
        }
    }
    if files.len() == 1 && files[0].0 == "default" {
        let (_, source) = files.remove(0);
        return Ok(Templates::Single(Box::new(ChatTemplate::new(source))));
    }
    if !files.is_empty() {
        return Ok(Templates::Named(
            files
                .into_iter()
                .map(|(name, source)| (name, ChatTemplate::new(source)))
                .collect(),
        ));
    }
    let config_path = dir.join("tokenizer_config.json");
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(Templates::None("the model has no chat template".into())),
        Some(Json::Str(source)) => Ok(Templates::Single(Box::new(ChatTemplate::new(source.clone())))),
        Some(Json::Array(items)) => items
            .iter()
            .map(|item| match (item.get("name"), item.get("template")) {
                (Some(Json::Str(name)), Some(Json::Str(source))) => {
                    Ok((name.clone(), ChatTemplate::new(source.clone())))
                }
                _ => Err(PromptError::Model {
                    path: config_path.clone(),
                    reason: "a chat_template entry without name and template".into(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Templates::Named),
        Some(_) => Err(PromptError::Model {
            path: config_path,
            reason: "chat_template is neither a string nor a list".into(),
        }),
    }
}

/// The special tokens transformers reads from the tokenizer config.
#[derive(Default)]
struct SpecialTokens {
    /// `special_tokens_map`: named tokens, template variables, in transformers' order.
    named: Vec<(String, String)>,
    /// The same tokens as `AddedToken`s, plus `extra_special_tokens`, to register.
    tokens: Vec<AddedToken>,
}

impl SpecialTokens {
    fn from_config(config: &Json) -> Self {
        let mut this = Self::default();
        for key in NAMED_SPECIAL_TOKENS {
            if let Some(token) = config.get(key).and_then(added_token) {
                this.push_named(key, token);
            }
        }
        // Model-specific named tokens: any other `*_token` string or AddedToken, and a dict of
        // `extra_special_tokens` (or the older `additional_special_tokens`).
        let extra = config
            .get("extra_special_tokens")
            .or_else(|| config.get("additional_special_tokens"));
        if let Json::Object(entries) = config {
            for (key, value) in entries {
                if key.ends_with("_token")
                    && !NAMED_SPECIAL_TOKENS.contains(&key.as_str())
                    && let Some(token) = added_token(value)
                {
                    this.push_named(key, token);
                }
            }
        }
        match extra {
            Some(Json::Object(entries)) => {
                for (key, value) in entries {
                    if let Some(token) = added_token(value) {
                        this.push_named(key, token);
                    }
                }
            }
            Some(Json::Array(items)) => this.tokens.extend(items.iter().filter_map(added_token)),
            _ => {}
        }
        this
    }

    fn push_named(&mut self, key: &str, token: AddedToken) {
        match self.named.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = token.content.clone(),
            None => self.named.push((key.to_string(), token.content.clone())),
        }
        self.tokens.retain(|t| t.content != token.content);
        self.tokens.push(token);
    }

    /// The legacy `special_tokens_map.json`, read when the config has no `added_tokens_decoder`;
    /// its entries win.
    fn merge_legacy_map(&mut self, map: &Json) {
        for key in NAMED_SPECIAL_TOKENS {
            if let Some(token) = map.get(key).and_then(added_token) {
                self.push_named(key, token);
            }
        }
    }
}

/// A special token as transformers reads it: a string, or an `AddedToken` object.
fn added_token(value: &Json) -> Option<AddedToken> {
    match value {
        Json::Str(content) => Some(AddedToken::from(content.clone(), true)),
        Json::Object(_) => {
            let content = value.get("content")?.as_str()?;
            let flag = |key: &str, default: bool| match value.get(key) {
                Some(Json::Bool(b)) => *b,
                _ => default,
            };
            Some(
                AddedToken::from(content.to_string(), true)
                    .single_word(flag("single_word", false))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .normalized(flag("normalized", false)),
            )
        }
        _ => None,
    }
}

/// What transformers 5's `TokenizersBackend` does to the tokenizer it loads from
/// `tokenizer.json` (`tokenization_utils_tokenizers.py`: `__init__`, `_post_init`,
/// `update_post_processor`).
fn apply_transformers_init(tokenizer: &mut Tokenizer, config: &Json, special: &SpecialTokens) -> Result<(), String> {
    // `added_tokens_decoder` entries the file does not hold as they are.
    if let Some(Json::Object(entries)) = config.get("added_tokens_decoder") {
        let existing = tokenizer.get_added_tokens_decoder();
        let mut sorted = entries
            .iter()
            .filter_map(|(id, token)| Some((id.parse::<u32>().ok()?, token)))
            .collect::<Vec<_>>();
        sorted.sort_by_key(|(id, _)| *id);
        let mut to_add = Vec::new();
        for (_, token) in sorted {
            let Some(content) = token.get("content").and_then(Json::as_str) else {
                continue;
            };
            let flag = |key: &str| matches!(token.get(key), Some(Json::Bool(true)));
            let wanted = AddedToken::from(content.to_string(), flag("special"))
                .single_word(flag("single_word"))
                .lstrip(flag("lstrip"))
                .rstrip(flag("rstrip"))
                .normalized(flag("normalized"));
            if !existing.values().any(|t| *t == wanted) {
                to_add.push(wanted);
            }
        }
        if !to_add.is_empty() {
            tokenizer.add_tokens(to_add).map_err(|err| err.to_string())?;
        }
    }
    // Named and extra special tokens not yet added tokens, then all of them as special tokens.
    let added: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let missing: Vec<AddedToken> = special
        .tokens
        .iter()
        .filter(|t| !added.contains(&t.content))
        .cloned()
        .collect();
    if !missing.is_empty() {
        tokenizer.add_tokens(missing).map_err(|err| err.to_string())?;
    }
    if !special.tokens.is_empty() {
        tokenizer
            .add_special_tokens(special.tokens.clone())
            .map_err(|err| err.to_string())?;
    }
    if let Some(Json::Bool(true)) = config.get("split_special_tokens") {
        tokenizer.set_encode_special_tokens(true);
    }
    let add_bos = config.get("add_bos_token");
    let add_eos = config.get("add_eos_token");
    if add_bos.is_some() || add_eos.is_some() || tokenizer.get_post_processor().is_none() {
        let named = |key: &str| special.named.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let mut single = String::new();
        let mut specials = Vec::new();
        for (flag, key, first) in [(add_bos, "bos_token", true), (add_eos, "eos_token", false)] {
            if !matches!(flag, Some(Json::Bool(true))) {
                continue;
            }
            let Some(token) = named(key) else { continue };
            let Some(id) = tokenizer.token_to_id(&token) else {
                return Err(format!("{key} {token} is not in the vocabulary"));
            };
            if first {
                single = format!("{token}:0 $A:0");
            } else {
                if single.is_empty() {
                    single = "$A:0".into();
                }
                single = format!("{single} {token}:0");
            }
            specials.push((token, id));
        }
        if single.is_empty() {
            single = "$A:0".into();
        }
        let pair = format!("{single} $B:1");
        let processor = TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|err| err.to_string())?
            .special_tokens(specials)
            .build()
            .map_err(|err| err.to_string())?;
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Chat requests

/// A message as vLLM hands it to the template (`ConversationMessage`), in vLLM's key order.
struct Message {
    role: String,
    fields: Vec<(&'static str, Value)>,
    /// The content, kept apart for `continue_final_message`.
    content: Content,
}

enum Content {
    Text(String),
    Parts(Vec<String>),
}

impl Message {
    fn to_value(&self) -> Value {
        let content = match &self.content {
            Content::Text(text) => Value::from(text.as_str()),
            Content::Parts(parts) => Value::from(
                parts
                    .iter()
                    .map(|text| Value::from_pairs([("type", "text"), ("text", text.as_str())]))
                    .collect::<Vec<_>>(),
            ),
        };
        let mut pairs: Vec<(&str, Value)> = vec![("role", Value::from(self.role.as_str()))];
        pairs.push(("content", content));
        pairs.extend(self.fields.iter().map(|(k, v)| (*k, v.clone())));
        Value::from_pairs(pairs)
    }

    /// Appends transformers' continuation tag to the final text and returns that text.
    fn mark_continuation(&mut self) -> Result<String, PromptError> {
        let text = match &mut self.content {
            Content::Text(text) => text,
            Content::Parts(parts) => parts
                .last_mut()
                .ok_or_else(|| rejected("no text in the final message to continue"))?,
        };
        let original = text.clone();
        text.push_str(CONTINUE_TAG);
        Ok(original)
    }
}

const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

fn cut_at_continuation(rendered: String, final_text: &str) -> Result<String, PromptError> {
    let tag = CONTINUE_TAG.trim_end();
    if !rendered.contains(py_strip(final_text)) || !rendered.contains(tag) {
        return Err(rejected("the template drops part of the final message to continue"));
    }
    let at = rendered.rfind(tag).unwrap_or(0);
    if rendered[at..].starts_with(CONTINUE_TAG) {
        Ok(rendered[..at].to_string())
    } else {
        Ok(py_rstrip(&rendered[..at]).to_string())
    }
}

/// One request message as vLLM's `_parse_chat_message_content` turns it into a
/// `ConversationMessage`.
fn conversation_message(message: &Json, format: ContentFormat) -> Result<Message, PromptError> {
    let Some(role) = message.get("role").and_then(Json::as_str) else {
        return Err(rejected("a message without a role"));
    };
    let mut texts: Vec<String> = match message.get("content") {
        None => Vec::new(),
        Some(Json::Null) if matches!(role, "assistant" | "function") => Vec::new(),
        Some(Json::Null) => return Err(rejected("a message with null content")),
        Some(Json::Str(text)) => vec![text.clone()],
        Some(Json::Array(parts)) => parts.iter().map(text_part).collect::<Result<_, _>>()?,
        Some(_) => return Err(rejected("message content is neither text nor parts")),
    };
    if role == "system" {
        texts = strip_billing_header(texts);
    }
    let content = match (format, role) {
        // Tool results are joined into one string whatever the format, empty parts included.
        (ContentFormat::OpenAi, "tool") => Content::Text(texts.join("\n")),
        (ContentFormat::OpenAi, _) => Content::Parts(texts),
        // Empty texts are dropped before joining.
        (ContentFormat::String, _) => Content::Text(
            texts
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    };

    let mut fields: Vec<(&'static str, Value)> = Vec::new();
    match role {
        "assistant" => {
            // `_postprocess_messages` drops an empty list of tool calls.
            if let Some(calls) = message
                .get("tool_calls")
                .filter(|c| !c.is_null() && **c != Json::Array(Vec::new()))
            {
                fields.push(("tool_calls", tool_calls(calls)?));
            }
            if let Some(reasoning) = message.get("reasoning").filter(|r| !r.is_null()) {
                let Json::Str(reasoning) = reasoning else {
                    return Err(rejected("`reasoning` is not text"));
                };
                fields.push(("reasoning", Value::from(reasoning.as_str())));
                fields.push(("reasoning_content", Value::from(reasoning.as_str())));
            }
        }
        "tool" => {
            if let Some(id) = message.get("tool_call_id") {
                fields.push(("tool_call_id", id.to_value()));
            }
        }
        _ => {}
    }
    for key in ["name", "task"] {
        if let Some(Json::Str(value)) = message.get(key) {
            fields.push((key, Value::from(value.as_str())));
        }
    }
    if role == "developer" {
        let tools = message.get("tools").map_or(Value::from(()), Json::to_value);
        fields.push(("tools", tools));
    }
    Ok(Message {
        role: role.to_string(),
        fields,
        content,
    })
}

/// A content part that is text; anything else (images, audio, embeddings, custom fields) is
/// not reproducible here.
fn text_part(part: &Json) -> Result<String, PromptError> {
    match part {
        Json::Str(text) => Ok(text.clone()),
        Json::Object(entries) => {
            if entries.iter().any(|(k, _)| k != "type" && k != "text") {
                return Err(unsupported("a content part with fields besides type and text"));
            }
            match (part.get("type"), part.get("text")) {
                (Some(Json::Str(kind)), Some(Json::Str(text)))
                    if matches!(kind.as_str(), "text" | "input_text" | "output_text") =>
                {
                    Ok(text.clone())
                }
                (Some(Json::Str(kind)), _) if kind == "text" => Err(unsupported("a text part without text")),
                _ => Err(unsupported("a content part that is not text")),
            }
        }
        _ => Err(rejected("a content part is neither text nor an object")),
    }
}

/// vLLM drops Claude Code's attribution header line from system text
/// (`_strip_claude_code_billing_header`).
fn strip_billing_header(texts: Vec<String>) -> Vec<String> {
    const HEADER: &str = "x-anthropic-billing-header";
    texts
        .into_iter()
        .filter_map(|text| {
            if !text.starts_with(HEADER) {
                return Some(text);
            }
            let rest = text.split_once('\n').map_or("", |(_, rest)| rest);
            (!rest.is_empty()).then(|| rest.to_string())
        })
        .collect()
}

/// Assistant tool calls as vLLM passes them: `arguments` JSON text parsed into an object.
fn tool_calls(calls: &Json) -> Result<Value, PromptError> {
    let Json::Array(calls) = calls else {
        return Err(rejected("`tool_calls` is not a list"));
    };
    calls
        .iter()
        .map(|call| {
            let Json::Object(entries) = call else {
                return Err(rejected("a tool call is not an object"));
            };
            if entries
                .iter()
                .any(|(k, _)| !matches!(k.as_str(), "id" | "type" | "function"))
            {
                return Err(unsupported("a tool call with fields besides id, type and function"));
            }
            let (Some(Json::Str(id)), Some(Json::Str(kind)), Some(function)) =
                (call.get("id"), call.get("type"), call.get("function"))
            else {
                return Err(rejected("a tool call without id, type and function"));
            };
            if kind != "function" {
                return Err(rejected("a tool call that is not a function"));
            }
            let Json::Object(function_entries) = function else {
                return Err(rejected("a tool call's function is not an object"));
            };
            if function_entries
                .iter()
                .any(|(k, _)| !matches!(k.as_str(), "name" | "arguments"))
            {
                return Err(unsupported(
                    "a tool call function with fields besides name and arguments",
                ));
            }
            let (Some(Json::Str(name)), Some(Json::Str(arguments))) = (function.get("name"), function.get("arguments"))
            else {
                return Err(rejected("a tool call function without name and arguments"));
            };
            // `_postprocess_messages`: empty or invalid JSON, or JSON that is not an object,
            // becomes `{}`.
            let arguments = match Json::parse_str(arguments) {
                Ok(object @ Json::Object(_)) => object.to_value(),
                // Python's json also reads NaN and Infinity.
                Err(_) if arguments.contains("NaN") || arguments.contains("Infinity") => {
                    return Err(unsupported("tool call arguments with NaN or Infinity"));
                }
                _ => Value::from_pairs(Vec::<(Value, Value)>::new()),
            };
            let function = Value::from_pairs([("arguments", arguments), ("name", Value::from(name.as_str()))]);
            Ok(Value::from_pairs([
                ("id", Value::from(id.as_str())),
                ("function", function),
                ("type", Value::from("function")),
            ]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

/// A template that never names the developer role gets developer messages as system messages,
/// all merged into one at the front (`_convert_developer_to_system`,
/// `_consolidate_system_messages`).
fn developer_to_system(conversation: Vec<Message>) -> Vec<Message> {
    let mut converted = Vec::with_capacity(conversation.len());
    for mut message in conversation {
        if message.role == "developer" {
            message.role = "system".into();
            message.fields.retain(|(k, _)| *k != "tools");
        }
        converted.push(message);
    }
    let systems = converted.iter().filter(|m| m.role == "system").count();
    let first_is_system = converted.first().is_some_and(|m| m.role == "system");
    if systems == 0 || (systems == 1 && first_is_system) {
        return converted;
    }
    let mut texts = Vec::new();
    let mut rest = Vec::new();
    for message in converted {
        if message.role != "system" {
            rest.push(message);
            continue;
        }
        let text = match message.content {
            Content::Text(text) => text,
            Content::Parts(parts) => parts.join("\n"),
        };
        if !text.is_empty() {
            texts.push(text);
        }
    }
    let merged = Message {
        role: "system".into(),
        fields: Vec::new(),
        content: Content::Text(texts.join("\n\n")),
    };
    std::iter::once(merged).chain(rest).collect()
}

/// The keyword arguments vLLM passes to the template, after `build_chat_params`,
/// `with_defaults` and `get_apply_chat_template_kwargs` (`merge_kwargs` drops `None` and
/// `"auto"` values).
fn template_kwargs(
    request: &Json,
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> Result<Vec<(String, Json)>, PromptError> {
    let unset = |v: &Json| v.is_null() || v.as_str() == Some("auto");
    let mut kwargs: Vec<(String, Json)> = Vec::new();
    let put = |kwargs: &mut Vec<(String, Json)>, key: &str, value: Json| match kwargs.iter_mut().find(|(k, _)| k == key)
    {
        Some(slot) => slot.1 = value,
        None => kwargs.push((key.to_string(), value)),
    };
    // Defaults: the request's tools (as vLLM's pydantic model dumps them).
    if let Some(tools) = request.get("tools").filter(|t| !t.is_null()) {
        put(&mut kwargs, "tools", dump_tools(tools)?);
    }
    // The request's `chat_template_kwargs`, overridden by its own fields.
    let user = match request.get("chat_template_kwargs") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Object(entries)) => entries.clone(),
        Some(_) => return Err(rejected("`chat_template_kwargs` is not an object")),
    };
    let mut chat = Vec::new();
    for (key, value) in user {
        match key.as_str() {
            _ if value.is_null() => put(&mut chat, &key, value),
            "chat_template" | "tokenize" | "conversation" | "messages" | "return_assistant_tokens_mask" => {
                return Err(unsupported(format!("chat_template_kwargs.{key}")));
            }
            // Arguments of `apply_chat_template` that do nothing when it does not tokenize.
            "padding" | "truncation" | "max_length" | "return_tensors" | "return_dict" | "tokenizer_kwargs" => {}
            _ => put(&mut chat, &key, value),
        }
    }
    let mut extra = vec![
        ("add_generation_prompt", Json::Bool(add_generation_prompt)),
        ("continue_final_message", Json::Bool(continue_final_message)),
        ("documents", request.get("documents").cloned().unwrap_or(Json::Null)),
    ];
    let reasoning_effort = request.get("reasoning_effort").cloned().unwrap_or(Json::Null);
    if !reasoning_effort.is_null() && !chat.iter().any(|(k, _)| k == "enable_thinking") {
        extra.push(("enable_thinking", Json::Bool(reasoning_effort.as_str() != Some("none"))));
    }
    extra.insert(3, ("reasoning_effort", reasoning_effort));
    for (key, value) in extra {
        if !unset(&value) {
            put(&mut chat, key, value);
        }
    }
    for (key, value) in chat {
        if !unset(&value) {
            put(&mut kwargs, &key, value);
        }
    }
    Ok(kwargs)
}

/// `ChatCompletionToolsParam.model_dump()`: `{"type", "function": {"name", "description",
/// "parameters", ["strict"], ["defer_loading"]}}`, other fields dropped.
fn dump_tools(tools: &Json) -> Result<Json, PromptError> {
    let Json::Array(tools) = tools else {
        return Err(rejected("`tools` is not a list"));
    };
    tools
        .iter()
        .map(|tool| {
            if tool.get("type").is_some_and(|t| t.as_str() != Some("function")) {
                return Err(rejected("a tool that is not a function"));
            }
            let Some(function @ Json::Object(_)) = tool.get("function") else {
                return Err(rejected("a tool without a function"));
            };
            let Some(Json::Str(name)) = function.get("name") else {
                return Err(rejected("a tool function without a name"));
            };
            let description = function.get("description").cloned().unwrap_or(Json::Null);
            if !matches!(description, Json::Null | Json::Str(_)) {
                return Err(rejected("a tool description that is not text"));
            }
            let parameters = function.get("parameters").cloned().unwrap_or(Json::Null);
            if !matches!(parameters, Json::Null | Json::Object(_)) {
                return Err(rejected("tool parameters that are not an object"));
            }
            let mut dumped = vec![
                ("name".to_string(), Json::Str(name.clone())),
                ("description".to_string(), description),
                ("parameters".to_string(), parameters),
            ];
            if let Some(strict) = function.get("strict").filter(|s| !s.is_null()) {
                let Json::Bool(_) = strict else {
                    return Err(rejected("tool `strict` is not a boolean"));
                };
                dumped.push(("strict".to_string(), strict.clone()));
            }
            let defer = function
                .get("defer_loading")
                .filter(|d| !d.is_null())
                .or_else(|| tool.get("defer_loading").filter(|d| !d.is_null()));
            let mut outer = vec![("type".to_string(), Json::Str("function".into()))];
            if let Some(defer) = defer {
                let Json::Bool(_) = defer else {
                    return Err(rejected("`defer_loading` is not a boolean"));
                };
                dumped.push(("defer_loading".to_string(), defer.clone()));
            }
            outer.push(("function".to_string(), Json::Object(dumped)));
            if let Some(defer) = tool.get("defer_loading").filter(|d| !d.is_null()) {
                outer.push(("defer_loading".to_string(), defer.clone()));
            }
            Ok(outer)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|tools| Json::Array(tools.into_iter().map(Json::Object).collect()))
}

// ---------------------------------------------------------------------------------------------
// The template environment: Jinja2 as transformers configures it

impl ChatTemplate {
    fn new(source: String) -> Self {
        let content_format = detect_content_format(&source);
        let env = environment(&source).map_err(|err| format!("{err:#}"));
        Self {
            env,
            source,
            content_format,
        }
    }
}

/// transformers' `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with
/// loop controls, its `tojson`, `raise_exception` and `strftime_now`, and Python's printing of
/// values and string methods.
fn environment(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(syntax()?);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_formatter(|out, _state, value| {
        let text = py_str(value)?;
        out.write_str(&text).map_err(Error::from)
    });
    env.set_unknown_method_callback(py_method);
    env.add_filter("tojson", tojson);
    env.add_filter("string", |value: &Value| py_str(value).map(Value::from));
    env.add_filter("trim", |value: &Value, chars: Option<String>| {
        let text = py_str(value)?;
        Ok::<_, Error>(match chars {
            Some(chars) => text.trim_matches(|c| chars.contains(c)).to_string(),
            None => py_strip(&text).to_string(),
        })
    });
    env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))?;
    Ok(env)
}

/// Jinja2 as transformers configures it: `trim_blocks`, `lstrip_blocks`, and (the default) no
/// trailing newline kept.
fn syntax() -> Result<minijinja::syntax::SyntaxConfig, Error> {
    minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
}

/// transformers' `{% generation %}` extension renders its body unchanged: the same as an
/// always-true `if`, with the same whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => write!(out, "{{%{open} if true {close}%}}"),
            "endgeneration" => write!(out, "{{%{open} endif {close}%}}"),
            _ => write!(out, "{}", &tag[..end + 2]),
        }
        .unwrap_or(());
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Python's `str.isspace`: Unicode whitespace and the four ASCII separators.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

fn py_strip(text: &str) -> &str {
    text.trim_matches(py_space)
}

fn py_rstrip(text: &str) -> &str {
    text.trim_end_matches(py_space)
}

/// Python string methods whose whitespace rules differ from Rust's; everything else goes to
/// minijinja-contrib's pycompat.
fn py_method(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(text) = value.as_str() {
        let no_chars = match args {
            [] => true,
            [arg] => arg.is_none(),
            _ => false,
        };
        if no_chars {
            match method {
                "strip" => return Ok(Value::from(py_strip(text))),
                "lstrip" => return Ok(Value::from(text.trim_start_matches(py_space))),
                "rstrip" => return Ok(Value::from(py_rstrip(text))),
                "split" => {
                    return Ok(Value::from(
                        text.split(py_space)
                            .filter(|s| !s.is_empty())
                            .map(Value::from)
                            .collect::<Vec<_>>(),
                    ));
                }
                _ => {}
            }
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `str(value)`, as Jinja2 prints a value.
fn py_str(value: &Value) -> Result<String, Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(String::new()),
        ValueKind::String => Ok(value.as_str().unwrap_or_default().to_string()),
        _ => {
            let mut out = String::new();
            py_repr(value, &mut out)?;
            Ok(out)
        }
    }
}

/// Python's `repr(value)` for the values a template sees (Jinja2 prints lists and dicts so).
fn py_repr(value: &Value, out: &mut String) -> Result<(), Error> {
    let not_python = |what: &str| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot print {what} as Python does"),
        )
    };
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => write!(out, "{value}").unwrap_or(()),
        ValueKind::Number => {
            let f = f64::try_from(value.clone()).map_err(|_| not_python("a number"))?;
            out.push_str(&py_float(f, false));
        }
        ValueKind::String => {
            let text = value.as_str().unwrap_or_default();
            let quote = if text.contains('\'') && !text.contains('"') {
                '"'
            } else {
                '\''
            };
            out.push(quote);
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    ' '..='~' => out.push(c),
                    c => match py_printable(c) {
                        Some(true) => out.push(c),
                        Some(false) => match c as u32 {
                            n if n < 0x100 => write!(out, "\\x{n:02x}"),
                            n if n < 0x10000 => write!(out, "\\u{n:04x}"),
                            n => write!(out, "\\U{n:08x}"),
                        }
                        .unwrap_or(()),
                        None => return Err(not_python("a character Python's repr may escape")),
                    },
                }
            }
            out.push(quote);
        }
        ValueKind::Seq => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let items = value.try_iter()?.collect::<Vec<_>>();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(item, out)?;
            }
            if tuple && items.len() == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        ValueKind::Undefined => return Err(not_python("an undefined value")),
        _ => return Err(not_python("this object")),
    }
    Ok(())
}

/// Whether Python's `repr` prints a character as it is (`str.isprintable`), escapes it
/// (control, format, separator and private-use characters), or `None` where this table does not
/// know (unassigned in Unicode 14, or outside the planes it covers).
fn py_printable(c: char) -> Option<bool> {
    let n = c as u32;
    if n < 0x20 || (0x7f..0xa0).contains(&n) {
        return Some(false);
    }
    if n < 0x7f {
        return Some(true);
    }
    let i = PY_REPR_RANGES.partition_point(|&(_, end, _)| end < n);
    PY_REPR_RANGES
        .get(i)
        .filter(|&&(start, _, _)| start <= n)
        .map(|&(_, _, printable)| printable)
}

/// `(first, last, printable)` ranges of assigned characters from U+0080 on: the Basic
/// Multilingual Plane, U+1F000..U+1FAFF (emoji, symbols) and CJK extension B. Generated from
/// Python 3.11's `unicodedata` (Unicode 14.0): printable means `chr(c).isprintable()`; a range
/// with `false` is assigned but escaped by `repr`; characters in no range were unassigned.
/// Characters assigned later than Unicode 14 are not in the table, so they fail instead of
/// depending on the engine's Python version.
#[rustfmt::skip]
const PY_REPR_RANGES: &[(u32, u32, bool)] = &[
    (0x80, 0xa0, false), (0xa1, 0xac, true), (0xad, 0xad, false), (0xae, 0x377, true),
    (0x37a, 0x37f, true), (0x384, 0x38a, true), (0x38c, 0x38c, true), (0x38e, 0x3a1, true),
    (0x3a3, 0x52f, true), (0x531, 0x556, true), (0x559, 0x58a, true), (0x58d, 0x58f, true),
    (0x591, 0x5c7, true), (0x5d0, 0x5ea, true), (0x5ef, 0x5f4, true), (0x600, 0x605, false),
    (0x606, 0x61b, true), (0x61c, 0x61c, false), (0x61d, 0x6dc, true), (0x6dd, 0x6dd, false),
    (0x6de, 0x70d, true), (0x70f, 0x70f, false), (0x710, 0x74a, true), (0x74d, 0x7b1, true),
    (0x7c0, 0x7fa, true), (0x7fd, 0x82d, true), (0x830, 0x83e, true), (0x840, 0x85b, true),
    (0x85e, 0x85e, true), (0x860, 0x86a, true), (0x870, 0x88e, true), (0x890, 0x891, false),
    (0x898, 0x8e1, true), (0x8e2, 0x8e2, false), (0x8e3, 0x983, true), (0x985, 0x98c, true),
    (0x98f, 0x990, true), (0x993, 0x9a8, true), (0x9aa, 0x9b0, true), (0x9b2, 0x9b2, true),
    (0x9b6, 0x9b9, true), (0x9bc, 0x9c4, true), (0x9c7, 0x9c8, true), (0x9cb, 0x9ce, true),
    (0x9d7, 0x9d7, true), (0x9dc, 0x9dd, true), (0x9df, 0x9e3, true), (0x9e6, 0x9fe, true),
    (0xa01, 0xa03, true), (0xa05, 0xa0a, true), (0xa0f, 0xa10, true), (0xa13, 0xa28, true),
    (0xa2a, 0xa30, true), (0xa32, 0xa33, true), (0xa35, 0xa36, true), (0xa38, 0xa39, true),
    (0xa3c, 0xa3c, true), (0xa3e, 0xa42, true), (0xa47, 0xa48, true), (0xa4b, 0xa4d, true),
    (0xa51, 0xa51, true), (0xa59, 0xa5c, true), (0xa5e, 0xa5e, true), (0xa66, 0xa76, true),
    (0xa81, 0xa83, true), (0xa85, 0xa8d, true), (0xa8f, 0xa91, true), (0xa93, 0xaa8, true),
    (0xaaa, 0xab0, true), (0xab2, 0xab3, true), (0xab5, 0xab9, true), (0xabc, 0xac5, true),
    (0xac7, 0xac9, true), (0xacb, 0xacd, true), (0xad0, 0xad0, true), (0xae0, 0xae3, true),
    (0xae6, 0xaf1, true), (0xaf9, 0xaff, true), (0xb01, 0xb03, true), (0xb05, 0xb0c, true),
    (0xb0f, 0xb10, true), (0xb13, 0xb28, true), (0xb2a, 0xb30, true), (0xb32, 0xb33, true),
    (0xb35, 0xb39, true), (0xb3c, 0xb44, true), (0xb47, 0xb48, true), (0xb4b, 0xb4d, true),
    (0xb55, 0xb57, true), (0xb5c, 0xb5d, true), (0xb5f, 0xb63, true), (0xb66, 0xb77, true),
    (0xb82, 0xb83, true), (0xb85, 0xb8a, true), (0xb8e, 0xb90, true), (0xb92, 0xb95, true),
    (0xb99, 0xb9a, true), (0xb9c, 0xb9c, true), (0xb9e, 0xb9f, true), (0xba3, 0xba4, true),
    (0xba8, 0xbaa, true), (0xbae, 0xbb9, true), (0xbbe, 0xbc2, true), (0xbc6, 0xbc8, true),
    (0xbca, 0xbcd, true), (0xbd0, 0xbd0, true), (0xbd7, 0xbd7, true), (0xbe6, 0xbfa, true),
    (0xc00, 0xc0c, true), (0xc0e, 0xc10, true), (0xc12, 0xc28, true), (0xc2a, 0xc39, true),
    (0xc3c, 0xc44, true), (0xc46, 0xc48, true), (0xc4a, 0xc4d, true), (0xc55, 0xc56, true),
    (0xc58, 0xc5a, true), (0xc5d, 0xc5d, true), (0xc60, 0xc63, true), (0xc66, 0xc6f, true),
    (0xc77, 0xc8c, true), (0xc8e, 0xc90, true), (0xc92, 0xca8, true), (0xcaa, 0xcb3, true),
    (0xcb5, 0xcb9, true), (0xcbc, 0xcc4, true), (0xcc6, 0xcc8, true), (0xcca, 0xccd, true),
    (0xcd5, 0xcd6, true), (0xcdd, 0xcde, true), (0xce0, 0xce3, true), (0xce6, 0xcef, true),
    (0xcf1, 0xcf2, true), (0xd00, 0xd0c, true), (0xd0e, 0xd10, true), (0xd12, 0xd44, true),
    (0xd46, 0xd48, true), (0xd4a, 0xd4f, true), (0xd54, 0xd63, true), (0xd66, 0xd7f, true),
    (0xd81, 0xd83, true), (0xd85, 0xd96, true), (0xd9a, 0xdb1, true), (0xdb3, 0xdbb, true),
    (0xdbd, 0xdbd, true), (0xdc0, 0xdc6, true), (0xdca, 0xdca, true), (0xdcf, 0xdd4, true),
    (0xdd6, 0xdd6, true), (0xdd8, 0xddf, true), (0xde6, 0xdef, true), (0xdf2, 0xdf4, true),
    (0xe01, 0xe3a, true), (0xe3f, 0xe5b, true), (0xe81, 0xe82, true), (0xe84, 0xe84, true),
    (0xe86, 0xe8a, true), (0xe8c, 0xea3, true), (0xea5, 0xea5, true), (0xea7, 0xebd, true),
    (0xec0, 0xec4, true), (0xec6, 0xec6, true), (0xec8, 0xecd, true), (0xed0, 0xed9, true),
    (0xedc, 0xedf, true), (0xf00, 0xf47, true), (0xf49, 0xf6c, true), (0xf71, 0xf97, true),
    (0xf99, 0xfbc, true), (0xfbe, 0xfcc, true), (0xfce, 0xfda, true), (0x1000, 0x10c5, true),
    (0x10c7, 0x10c7, true), (0x10cd, 0x10cd, true), (0x10d0, 0x1248, true), (0x124a, 0x124d, true),
    (0x1250, 0x1256, true), (0x1258, 0x1258, true), (0x125a, 0x125d, true), (0x1260, 0x1288, true),
    (0x128a, 0x128d, true), (0x1290, 0x12b0, true), (0x12b2, 0x12b5, true), (0x12b8, 0x12be, true),
    (0x12c0, 0x12c0, true), (0x12c2, 0x12c5, true), (0x12c8, 0x12d6, true), (0x12d8, 0x1310, true),
    (0x1312, 0x1315, true), (0x1318, 0x135a, true), (0x135d, 0x137c, true), (0x1380, 0x1399, true),
    (0x13a0, 0x13f5, true), (0x13f8, 0x13fd, true), (0x1400, 0x167f, true),
    (0x1680, 0x1680, false), (0x1681, 0x169c, true), (0x16a0, 0x16f8, true),
    (0x1700, 0x1715, true), (0x171f, 0x1736, true), (0x1740, 0x1753, true), (0x1760, 0x176c, true),
    (0x176e, 0x1770, true), (0x1772, 0x1773, true), (0x1780, 0x17dd, true), (0x17e0, 0x17e9, true),
    (0x17f0, 0x17f9, true), (0x1800, 0x180d, true), (0x180e, 0x180e, false),
    (0x180f, 0x1819, true), (0x1820, 0x1878, true), (0x1880, 0x18aa, true), (0x18b0, 0x18f5, true),
    (0x1900, 0x191e, true), (0x1920, 0x192b, true), (0x1930, 0x193b, true), (0x1940, 0x1940, true),
    (0x1944, 0x196d, true), (0x1970, 0x1974, true), (0x1980, 0x19ab, true), (0x19b0, 0x19c9, true),
    (0x19d0, 0x19da, true), (0x19de, 0x1a1b, true), (0x1a1e, 0x1a5e, true), (0x1a60, 0x1a7c, true),
    (0x1a7f, 0x1a89, true), (0x1a90, 0x1a99, true), (0x1aa0, 0x1aad, true), (0x1ab0, 0x1ace, true),
    (0x1b00, 0x1b4c, true), (0x1b50, 0x1b7e, true), (0x1b80, 0x1bf3, true), (0x1bfc, 0x1c37, true),
    (0x1c3b, 0x1c49, true), (0x1c4d, 0x1c88, true), (0x1c90, 0x1cba, true), (0x1cbd, 0x1cc7, true),
    (0x1cd0, 0x1cfa, true), (0x1d00, 0x1f15, true), (0x1f18, 0x1f1d, true), (0x1f20, 0x1f45, true),
    (0x1f48, 0x1f4d, true), (0x1f50, 0x1f57, true), (0x1f59, 0x1f59, true), (0x1f5b, 0x1f5b, true),
    (0x1f5d, 0x1f5d, true), (0x1f5f, 0x1f7d, true), (0x1f80, 0x1fb4, true), (0x1fb6, 0x1fc4, true),
    (0x1fc6, 0x1fd3, true), (0x1fd6, 0x1fdb, true), (0x1fdd, 0x1fef, true), (0x1ff2, 0x1ff4, true),
    (0x1ff6, 0x1ffe, true), (0x2000, 0x200f, false), (0x2010, 0x2027, true),
    (0x2028, 0x202f, false), (0x2030, 0x205e, true), (0x205f, 0x2064, false),
    (0x2066, 0x206f, false), (0x2070, 0x2071, true), (0x2074, 0x208e, true),
    (0x2090, 0x209c, true), (0x20a0, 0x20c0, true), (0x20d0, 0x20f0, true), (0x2100, 0x218b, true),
    (0x2190, 0x2426, true), (0x2440, 0x244a, true), (0x2460, 0x2b73, true), (0x2b76, 0x2b95, true),
    (0x2b97, 0x2cf3, true), (0x2cf9, 0x2d25, true), (0x2d27, 0x2d27, true), (0x2d2d, 0x2d2d, true),
    (0x2d30, 0x2d67, true), (0x2d6f, 0x2d70, true), (0x2d7f, 0x2d96, true), (0x2da0, 0x2da6, true),
    (0x2da8, 0x2dae, true), (0x2db0, 0x2db6, true), (0x2db8, 0x2dbe, true), (0x2dc0, 0x2dc6, true),
    (0x2dc8, 0x2dce, true), (0x2dd0, 0x2dd6, true), (0x2dd8, 0x2dde, true), (0x2de0, 0x2e5d, true),
    (0x2e80, 0x2e99, true), (0x2e9b, 0x2ef3, true), (0x2f00, 0x2fd5, true), (0x2ff0, 0x2ffb, true),
    (0x3000, 0x3000, false), (0x3001, 0x303f, true), (0x3041, 0x3096, true),
    (0x3099, 0x30ff, true), (0x3105, 0x312f, true), (0x3131, 0x318e, true), (0x3190, 0x31e3, true),
    (0x31f0, 0x321e, true), (0x3220, 0xa48c, true), (0xa490, 0xa4c6, true), (0xa4d0, 0xa62b, true),
    (0xa640, 0xa6f7, true), (0xa700, 0xa7ca, true), (0xa7d0, 0xa7d1, true), (0xa7d3, 0xa7d3, true),
    (0xa7d5, 0xa7d9, true), (0xa7f2, 0xa82c, true), (0xa830, 0xa839, true), (0xa840, 0xa877, true),
    (0xa880, 0xa8c5, true), (0xa8ce, 0xa8d9, true), (0xa8e0, 0xa953, true), (0xa95f, 0xa97c, true),
    (0xa980, 0xa9cd, true), (0xa9cf, 0xa9d9, true), (0xa9de, 0xa9fe, true), (0xaa00, 0xaa36, true),
    (0xaa40, 0xaa4d, true), (0xaa50, 0xaa59, true), (0xaa5c, 0xaac2, true), (0xaadb, 0xaaf6, true),
    (0xab01, 0xab06, true), (0xab09, 0xab0e, true), (0xab11, 0xab16, true), (0xab20, 0xab26, true),
    (0xab28, 0xab2e, true), (0xab30, 0xab6b, true), (0xab70, 0xabed, true), (0xabf0, 0xabf9, true),
    (0xac00, 0xd7a3, true), (0xd7b0, 0xd7c6, true), (0xd7cb, 0xd7fb, true),
    (0xe000, 0xf8ff, false), (0xf900, 0xfa6d, true), (0xfa70, 0xfad9, true),
    (0xfb00, 0xfb06, true), (0xfb13, 0xfb17, true), (0xfb1d, 0xfb36, true), (0xfb38, 0xfb3c, true),
    (0xfb3e, 0xfb3e, true), (0xfb40, 0xfb41, true), (0xfb43, 0xfb44, true), (0xfb46, 0xfbc2, true),
    (0xfbd3, 0xfd8f, true), (0xfd92, 0xfdc7, true), (0xfdcf, 0xfdcf, true), (0xfdf0, 0xfe19, true),
    (0xfe20, 0xfe52, true), (0xfe54, 0xfe66, true), (0xfe68, 0xfe6b, true), (0xfe70, 0xfe74, true),
    (0xfe76, 0xfefc, true), (0xfeff, 0xfeff, false), (0xff01, 0xffbe, true),
    (0xffc2, 0xffc7, true), (0xffca, 0xffcf, true), (0xffd2, 0xffd7, true), (0xffda, 0xffdc, true),
    (0xffe0, 0xffe6, true), (0xffe8, 0xffee, true), (0xfff9, 0xfffb, false),
    (0xfffc, 0xfffd, true), (0x1f000, 0x1f02b, true), (0x1f030, 0x1f093, true),
    (0x1f0a0, 0x1f0ae, true), (0x1f0b1, 0x1f0bf, true), (0x1f0c1, 0x1f0cf, true),
    (0x1f0d1, 0x1f0f5, true), (0x1f100, 0x1f1ad, true), (0x1f1e6, 0x1f202, true),
    (0x1f210, 0x1f23b, true), (0x1f240, 0x1f248, true), (0x1f250, 0x1f251, true),
    (0x1f260, 0x1f265, true), (0x1f300, 0x1f6d7, true), (0x1f6dd, 0x1f6ec, true),
    (0x1f6f0, 0x1f6fc, true), (0x1f700, 0x1f773, true), (0x1f780, 0x1f7d8, true),
    (0x1f7e0, 0x1f7eb, true), (0x1f7f0, 0x1f7f0, true), (0x1f800, 0x1f80b, true),
    (0x1f810, 0x1f847, true), (0x1f850, 0x1f859, true), (0x1f860, 0x1f887, true),
    (0x1f890, 0x1f8ad, true), (0x1f8b0, 0x1f8b1, true), (0x1f900, 0x1fa53, true),
    (0x1fa60, 0x1fa6d, true), (0x1fa70, 0x1fa74, true), (0x1fa78, 0x1fa7c, true),
    (0x1fa80, 0x1fa86, true), (0x1fa90, 0x1faac, true), (0x1fab0, 0x1faba, true),
    (0x1fac0, 0x1fac5, true), (0x1fad0, 0x1fad9, true), (0x1fae0, 0x1fae7, true),
    (0x1faf0, 0x1faf6, true), (0x20000, 0x2a6df, true),
];

/// Python's `repr(float)` (shortest round trip; exponent below 1e-4 and from 1e16), or
/// `json.dumps`' spelling of the non-finite values.
fn py_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        return match (f > 0.0, json) {
            (true, true) => "Infinity",
            (false, true) => "-Infinity",
            (true, false) => "inf",
            (false, false) => "-inf",
        }
        .into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let point = exp + 1;
    let n = digits.len() as i32;
    if (-3..=16).contains(&point) {
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point >= n {
            format!("{sign}{digits}{}.0", "0".repeat((point - n) as usize))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exp.abs())
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, not Jinja's HTML-escaping filter.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(
                " ".repeat(
                    i64::try_from(v)
                        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "indent"))?
                        .max(0) as usize,
                ),
            ),
        },
    };
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts = v.try_iter()?.collect::<Vec<_>>();
            match parts.as_slice() {
                [item, key] => (
                    item.as_str().unwrap_or_default().to_string(),
                    key.as_str().unwrap_or_default().to_string(),
                ),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "separators")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let dumper = JsonDumper {
        ensure_ascii,
        indent,
        separators,
        sort_keys,
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    separators: (String, String),
    sort_keys: bool,
}

impl JsonDumper {
    fn dump(&self, value: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        let not_json = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("{what} is not JSON serializable"));
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => write!(out, "{value}").unwrap_or(()),
            ValueKind::Number => {
                let f = f64::try_from(value.clone()).map_err(|_| not_json("a number"))?;
                out.push_str(&py_float(f, true));
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq => {
                let items = value.try_iter()?.collect::<Vec<_>>();
                self.container('[', ']', items.len(), level, out, |i, out| {
                    self.dump(&items[i], level + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys = value.try_iter()?.collect::<Vec<_>>();
                let key_text = |key: &Value| -> Result<String, Error> {
                    Ok(match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                        ValueKind::Number if key.is_integer() => key.to_string(),
                        ValueKind::Number => py_float(f64::try_from(key.clone()).map_err(|_| not_json("a key"))?, true),
                        _ => return Err(not_json("a key")),
                    })
                };
                if self.sort_keys {
                    let mut keyed = keys
                        .into_iter()
                        .map(|k| key_text(&k).map(|t| (t, k)))
                        .collect::<Result<Vec<_>, _>>()?;
                    keyed.sort_by(|a, b| a.0.cmp(&b.0));
                    keys = keyed.into_iter().map(|(_, k)| k).collect();
                }
                self.container('{', '}', keys.len(), level, out, |i, out| {
                    self.string(&key_text(&keys[i])?, out);
                    out.push_str(&self.separators.1);
                    self.dump(&value.get_item(&keys[i])?, level + 1, out)
                })?;
            }
            ValueKind::Undefined => return Err(not_json("Undefined")),
            _ => return Err(not_json("this object")),
        }
        Ok(())
    }

    fn container(
        &self,
        open: char,
        close: char,
        len: usize,
        level: usize,
        out: &mut String,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.separators.0);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level + 1));
            }
            item(i, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, text: &str, out: &mut String) {
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\x08' => out.push_str("\\b"),
                '\x0c' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap_or(()),
                c if self.ensure_ascii && !(' '..='~').contains(&c) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        write!(out, "\\u{unit:04x}").unwrap_or(());
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `datetime.now().strftime(format)` in UTC, for the codes chat templates use.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "clock before 1970"))?
        .as_secs();
    strftime(&format, secs).map(Value::from)
}

fn strftime(format: &str, unix_secs: u64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut code = chars.next();
        let pad = if code == Some('-') {
            code = chars.next();
            false
        } else {
            true
        };
        let num = |out: &mut String, n: i64, width: usize| {
            if pad {
                write!(out, "{n:0width$}").unwrap_or(())
            } else {
                write!(out, "{n}").unwrap_or(())
            }
        };
        match code {
            Some('Y') => write!(out, "{year}").unwrap_or(()),
            Some('y') => num(&mut out, year % 100, 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => write!(out, "{day:2}").unwrap_or(()),
            Some('j') => num(&mut out, yday, 3),
            Some('H') => num(&mut out, hour as i64, 2),
            Some('I') => num(&mut out, hour12 as i64, 2),
            Some('M') => num(&mut out, minute as i64, 2),
            Some('S') => num(&mut out, second as i64, 2),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}").unwrap_or(()),
            Some('Z') | Some('z') => {}
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime code %{} is not supported here", other.unwrap_or(' ')),
                ));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Content format detection: vLLM's `_detect_content_format` over minijinja's syntax tree

/// "openai" when some `for` loop iterates over a message's `content` (directly, through a
/// variable bound to the messages, or through a macro parameter given the content), else
/// "string"; like vLLM, a template that does not parse, or an unexpected assignment shape,
/// counts as "string".
fn detect_content_format(source: &str) -> ContentFormat {
    let source = without_generation_tags(source);
    let Ok(syntax) = syntax() else {
        return ContentFormat::String;
    };
    let Ok(tree) = minijinja::machinery::parse(&source, TEMPLATE_NAME, syntax) else {
        return ContentFormat::String;
    };
    let mut nodes = Nodes::default();
    nodes.stmt(&tree, &[]);
    nodes.content_format().unwrap_or(ContentFormat::String)
}

/// The nodes vLLM's detection looks at, in document order.
#[derive(Default)]
struct Nodes<'n, 'a> {
    /// `{% set target = value %}`.
    sets: Vec<(&'n ast::Expr<'a>, &'n ast::Expr<'a>)>,
    /// `for` loops with the indices (into `macros`) of the macros they are in, outermost first.
    loops: Vec<(&'n ast::ForLoop<'a>, Vec<usize>)>,
    macros: Vec<&'n ast::Macro<'a>>,
    calls: Vec<&'n ast::Call<'a>>,
}

impl<'n, 'a> Nodes<'n, 'a> {
    fn stmts(&mut self, stmts: &'n [ast::Stmt<'a>], macros: &[usize]) {
        for stmt in stmts {
            self.stmt(stmt, macros);
        }
    }

    fn stmt(&mut self, stmt: &'n ast::Stmt<'a>, macros: &[usize]) {
        use ast::Stmt;
        match stmt {
            Stmt::Template(t) => self.stmts(&t.children, macros),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::ForLoop(f) => {
                self.loops.push((f, macros.to_vec()));
                self.expr(&f.target);
                self.expr(&f.iter);
                if let Some(filter) = &f.filter_expr {
                    self.expr(filter);
                }
                self.stmts(&f.body, macros);
                self.stmts(&f.else_body, macros);
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body, macros);
                self.stmts(&i.false_body, macros);
            }
            Stmt::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.expr(target);
                    self.expr(value);
                }
                self.stmts(&w.body, macros);
            }
            Stmt::Set(s) => {
                self.sets.push((&s.target, &s.expr));
                self.expr(&s.target);
                self.expr(&s.expr);
            }
            Stmt::SetBlock(s) => {
                self.expr(&s.target);
                if let Some(filter) = &s.filter {
                    self.expr(filter);
                }
                self.stmts(&s.body, macros);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body, macros);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body, macros);
            }
            Stmt::Block(b) => self.stmts(&b.body, macros),
            Stmt::Macro(m) => {
                self.macros.push(m);
                let mut inner = macros.to_vec();
                inner.push(self.macros.len() - 1);
                for arg in m.args.iter().chain(&m.defaults) {
                    self.expr(arg);
                }
                self.stmts(&m.body, &inner);
            }
            Stmt::CallBlock(c) => {
                self.call(&c.call);
                // The caller body is no macro to Jinja2.
                self.stmts(&c.macro_decl.body, macros);
            }
            Stmt::Do(d) => self.call(&d.call),
            _ => {}
        }
    }

    fn call(&mut self, call: &'n ast::Call<'a>) {
        self.calls.push(call);
        self.expr(&call.expr);
        for arg in &call.args {
            self.call_arg(arg);
        }
    }

    fn call_arg(&mut self, arg: &'n ast::CallArg<'a>) {
        match arg {
            ast::CallArg::Pos(e)
            | ast::CallArg::Kwarg(_, e)
            | ast::CallArg::PosSplat(e)
            | ast::CallArg::KwargSplat(e) => self.expr(e),
        }
    }

    fn expr(&mut self, expr: &'n ast::Expr<'a>) {
        use ast::Expr;
        match expr {
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(e);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(e) = &i.false_expr {
                    self.expr(e);
                }
            }
            Expr::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.expr(e);
                }
                for arg in &f.args {
                    self.call_arg(arg);
                }
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                for arg in &t.args {
                    self.call_arg(arg);
                }
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => self.call(c),
            Expr::List(l) => l.items.iter().for_each(|e| self.expr(e)),
            Expr::Tuple(t) => t.items.iter().for_each(|e| self.expr(e)),
            Expr::Map(m) => {
                for e in m.keys.iter().chain(&m.values) {
                    self.expr(e);
                }
            }
            _ => {}
        }
    }

    /// `None` where vLLM's detection would raise (and fall back to "string").
    fn content_format(&self) -> Option<ContentFormat> {
        // Variables bound to the messages: `{% set name = messages... %}`, transitively.
        let mut message_lists = vec!["messages"];
        let mut queue = vec!["messages"];
        while let Some(name) = queue.pop() {
            for (target, value) in &self.sets {
                if is_var_or_elems(value, name, None) {
                    let target = var_name(target)?;
                    if !message_lists.contains(&target) {
                        message_lists.push(target);
                        queue.push(target);
                    }
                }
            }
        }
        // Loop variables over the messages.
        let mut messages = Vec::new();
        for (f, _) in &self.loops {
            if message_lists.iter().any(|v| is_var_or_elems(&f.iter, v, None)) {
                messages.push(var_name(&f.target)?);
            }
        }
        let is_content = |e: &ast::Expr| messages.iter().any(|m| is_var_or_elems(e, m, Some("content")));
        // Macro parameters given a message's content.
        let mut content_params: Vec<Vec<&str>> = Vec::new();
        for m in &self.macros {
            let params: Vec<&str> = m.args.iter().filter_map(var_name).collect();
            let mut given = Vec::new();
            for call in &self.calls {
                if !matches!(&call.expr, ast::Expr::Var(v) if v.id == m.name) {
                    continue;
                }
                let mut position = 0;
                for arg in &call.args {
                    match arg {
                        ast::CallArg::Pos(e) => {
                            if position < params.len() && is_content(e) {
                                given.push(params[position]);
                            }
                            position += 1;
                        }
                        ast::CallArg::Kwarg(key, e) if params.contains(key) && is_content(e) => {
                            given.push(*key);
                        }
                        _ => {}
                    }
                }
            }
            content_params.push(given);
        }
        for (f, macros) in &self.loops {
            if is_content(&f.iter) {
                var_name(&f.target)?;
                return Some(ContentFormat::OpenAi);
            }
            let ast::Expr::Var(iter) = &f.iter else {
                continue;
            };
            // The innermost enclosing macro with content parameters decides.
            let params = macros.iter().rev().map(|&i| &content_params[i]).find(|p| !p.is_empty());
            let hit = match params {
                Some(params) => params.contains(&iter.id),
                None => macros.is_empty() && iter.id == "content",
            };
            if hit {
                var_name(&f.target)?;
                return Some(ContentFormat::OpenAi);
            }
        }
        Some(ContentFormat::String)
    }
}

fn var_name<'a>(expr: &ast::Expr<'a>) -> Option<&'a str> {
    match expr {
        ast::Expr::Var(v) => Some(v.id),
        _ => None,
    }
}

/// vLLM's `_is_var_or_elems_access`: `name`, or `name[key]` / `name.key` with a key, seen
/// through filters, tests and slices.
fn is_var_or_elems(expr: &ast::Expr, name: &str, key: Option<&str>) -> bool {
    match expr {
        ast::Expr::Filter(f) => f.expr.as_ref().is_some_and(|e| is_var_or_elems(e, name, key)),
        ast::Expr::Test(t) => is_var_or_elems(&t.expr, name, key),
        ast::Expr::Slice(s) => is_var_or_elems(&s.expr, name, key),
        _ => match key {
            None => matches!(expr, ast::Expr::Var(v) if v.id == name),
            Some(key) => match expr {
                ast::Expr::GetItem(g) => {
                    matches!(&g.expr, ast::Expr::Var(v) if v.id == name)
                        && matches!(&g.subscript_expr, ast::Expr::Const(c) if c.value.as_str() == Some(key))
                }
                ast::Expr::GetAttr(g) => matches!(&g.expr, ast::Expr::Var(v) if v.id == name) && g.name == key,
                _ => false,
            },
        },
    }
}

// ---------------------------------------------------------------------------------------------
// JSON as Python's `json.loads` reads it: key order kept, integers of any size kept as integers

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse_body(body: &[u8]) -> Result<Json, PromptError> {
        let text = std::str::from_utf8(body).map_err(|_| rejected("the body is not UTF-8"))?;
        match Json::parse_str(text) {
            Ok(json @ Json::Object(_)) => Ok(json),
            Ok(_) => Err(rejected("the body is not a JSON object")),
            Err(reason) => Err(rejected(format!("the body is not JSON: {reason}"))),
        }
    }

    fn parse_str(text: &str) -> Result<Json, String> {
        let raw: &RawValue = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Json::from_raw(raw.get())
    }

    fn from_raw(raw: &str) -> Result<Json, String> {
        let err = |e: serde_json::Error| e.to_string();
        Ok(match raw.as_bytes().first() {
            Some(b'{') => {
                let RawObject(entries) = serde_json::from_str(raw).map_err(err)?;
                Json::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| Json::from_raw(v.get()).map(|v| (k, v)))
                        .collect::<Result<_, _>>()?,
                )
            }
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_str(raw).map_err(err)?;
                Json::Array(
                    items
                        .into_iter()
                        .map(|v| Json::from_raw(v.get()))
                        .collect::<Result<_, _>>()?,
                )
            }
            Some(b'"') => Json::Str(serde_json::from_str(raw).map_err(err)?),
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'n') => Json::Null,
            _ if raw.contains(['.', 'e', 'E']) => Json::Float(raw.parse().map_err(|_| format!("bad number {raw}"))?),
            _ => Json::Int(raw.parse().map_err(|_| format!("integer {raw} is too large"))?),
        })
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    fn is_int(&self) -> bool {
        matches!(self, Json::Int(_))
    }

    /// A boolean request field, `default` when absent; other types are not reproduced
    /// (pydantic's lax coercions).
    fn bool_field(&self, key: &str, default: bool) -> Result<bool, PromptError> {
        match self.get(key) {
            None => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(Json::Null) => Err(rejected(format!("`{key}` is null"))),
            Some(_) => Err(unsupported(format!("`{key}` is not a boolean"))),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::from(()),
            Json::Bool(b) => Value::from(*b),
            Json::Int(i) => match i64::try_from(*i) {
                Ok(i) => Value::from(i),
                Err(_) => Value::from(*i),
            },
            Json::Float(f) => Value::from(*f),
            Json::Str(s) => Value::from(s.as_str()),
            Json::Array(items) => Value::from(items.iter().map(Json::to_value).collect::<Vec<_>>()),
            Json::Object(entries) => Value::from_pairs(entries.iter().map(|(k, v)| (k.as_str(), v.to_value()))),
        }
    }
}

/// An object's members in order; a repeated key keeps its first place and its last value, as a
/// Python dict does.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut entries: Vec<(String, &'a RawValue)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, &'a RawValue>()? {
                    match entries.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => entries.push((key, value)),
                    }
                }
                Ok(RawObject(entries))
            }
        }
        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456.789, "123456.789"),
            (1e100, "1e+100"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
        ];
        for (f, python) in cases {
            assert_eq!(py_float(f, false), python, "{f}");
        }
        assert_eq!(py_float(f64::INFINITY, true), "Infinity");
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208.
        let secs = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", secs).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d %H:%M:%S %j %p %I %y %%", secs).unwrap(),
            "Friday July 26 13:25:09 208 PM 01 24 %"
        );
        assert!(strftime("%Q", secs).is_err());
    }

    #[test]
    fn json_keeps_key_order_and_big_integers() {
        let json = Json::parse_str(r#"{"b": 1, "a": [1.0, 2, 123456789012345678901234], "b": 3}"#).unwrap();
        let Json::Object(entries) = &json else {
            panic!("not an object")
        };
        assert_eq!(entries[0], ("b".into(), Json::Int(3)));
        assert_eq!(
            entries[1].1,
            Json::Array(vec![
                Json::Float(1.0),
                Json::Int(2),
                Json::Int(123_456_789_012_345_678_901_234)
            ])
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env = environment(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true, ensure_ascii=true) }}",
        )
        .unwrap();
        let x = Json::parse_str(r#"{"z": "é<&>\n", "a": [1, 2.5, null, true], "e": {}}"#).unwrap();
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(Value::from_pairs([("x", x.to_value())]))
            .unwrap();
        assert_eq!(
            out,
            "{\"z\": \"é<&>\\n\", \"a\": [1, 2.5, null, true], \"e\": {}}|{\n  \"z\": \"é<&>\\n\",\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"e\": {}\n}|{\"a\": [1, 2.5, null, true], \"e\": {}, \"z\": \"\\u00e9<&>\\n\"}"
        );
    }

    #[test]
    fn values_print_as_python_str() {
        let env = environment("{{ n }} {{ t }} {{ l }} {{ u }}|{{ s.strip() }}|{{ s | trim }}|").unwrap();
        let ctx = Value::from_pairs([
            ("n", Value::from(())),
            ("t", Value::from(true)),
            ("l", Json::parse_str(r#"[1, "it's", {"k": null}]"#).unwrap().to_value()),
            ("s", Value::from("\x1c a \u{3000}")),
        ]);
        let out = env.get_template(TEMPLATE_NAME).unwrap().render(ctx).unwrap();
        assert_eq!(out, "None True [1, \"it's\", {'k': None}] |a|a|");
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            without_generation_tags("a{%- generation -%} b {% endgeneration %}c{{ x }}{%if y%}"),
            "a{%- if true -%} b {% endif %}c{{ x }}{%if y%}"
        );
    }

    #[test]
    fn content_format_follows_vllm_detection() {
        let cases = [
            (
                "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                ContentFormat::String,
            ),
            (
                "{% for m in messages %}{% for c in m['content'] %}{{ c.text }}{% endfor %}{% endfor %}",
                ContentFormat::OpenAi,
            ),
            (
                "{% set msgs = messages[1:] %}{% for m in msgs %}{% for c in m.content | selectattr('type') %}{% endfor %}{% endfor %}",
                ContentFormat::OpenAi,
            ),
            (
                "{% macro render(content) %}{% for c in content %}{{ c }}{% endfor %}{% endmacro %}{% for m in messages %}{{ render(m.content) }}{% endfor %}",
                ContentFormat::OpenAi,
            ),
            (
                "{% for m in messages %}{% set content = m.content %}{% for c in content %}{% endfor %}{% endfor %}",
                ContentFormat::OpenAi,
            ),
            (
                "{% for m in messages %}{% for c in m.other %}{% endfor %}{% endfor %}",
                ContentFormat::String,
            ),
            ("{% for %}", ContentFormat::String),
        ];
        for (source, format) in cases {
            assert_eq!(detect_content_format(source), format, "{source}");
        }
    }
}
