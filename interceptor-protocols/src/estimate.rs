//! Token estimates with OpenAI's tokenizers (tiktoken's `o200k_base` and `cl100k_base`), for
//! OpenAI-style streams that carry no usage: the prompt from the request's messages (the counting
//! rule of OpenAI's cookbook: 3 tokens per message, 1 per name, 3 to prime the reply) and the
//! output from the text the stream delivered. Estimates are CPU work: run them off the I/O threads.

use std::borrow::Cow;

use serde::Deserialize;

use crate::usage::Usage;

/// Text kept for an estimate is capped (a longer prompt or output is counted up to the cap and the
/// estimate is a lower bound).
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// The tokenizer a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    /// `cl100k_base` for GPT-4, GPT-3.5 and the embeddings models; `o200k_base` for GPT-4o and
    /// later, and for models of other providers (whose own tokenizers are not public: an estimate).
    pub fn for_model(model: &str) -> Self {
        let model = model.to_ascii_lowercase();
        let legacy = ["gpt-4-", "gpt-3.5", "text-embedding", "davinci", "babbage"];
        if model == "gpt-4" || legacy.iter().any(|p| model.starts_with(p)) && !model.starts_with("gpt-4-o") {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    /// Number of tokens of `text` (special tokens are counted as plain text).
    pub fn count(self, text: &str) -> u64 {
        let bpe = match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        bpe.encode_ordinary(text).len() as u64
    }

    /// Loads the tokenizer tables (a few hundred milliseconds once; do it at startup).
    pub fn warm_up() {
        Encoding::O200kBase.count("warm up");
        Encoding::Cl100kBase.count("warm up");
    }
}

/// The prompt of a request, as text per message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// (role, name, content) per chat message; a completions prompt is one message without role.
    pub messages: Vec<(String, Option<String>, String)>,
    /// The text went over [`MAX_TEXT_BYTES`] and was cut.
    pub truncated: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    #[serde(borrow)]
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<Content<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField<'a> {
    #[serde(borrow)]
    Text(Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
}

#[derive(Deserialize)]
struct RequestText<'a> {
    #[serde(borrow, default)]
    messages: Vec<Message<'a>>,
    #[serde(borrow)]
    prompt: Option<PromptField<'a>>,
}

impl Prompt {
    /// The prompt of a chat completions or completions request body.
    pub fn from_request(body: &[u8]) -> Result<Self, serde_json::Error> {
        let request: RequestText<'_> = serde_json::from_slice(body)?;
        let mut prompt = Prompt::default();
        let mut budget = MAX_TEXT_BYTES;
        let mut take = |text: &str, prompt: &mut Prompt| -> String {
            let cut = floor_char_boundary(text, budget);
            if cut < text.len() {
                prompt.truncated = true;
            }
            budget -= cut;
            text[..cut].to_owned()
        };
        for message in &request.messages {
            let content = match &message.content {
                None => String::new(),
                Some(Content::Text(text)) => take(text, &mut prompt),
                Some(Content::Parts(parts)) => {
                    let joined: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                    take(&joined, &mut prompt)
                }
            };
            let role = message.role.as_deref().unwrap_or("user").to_owned();
            let name = message.name.as_deref().map(str::to_owned);
            prompt.messages.push((role, name, content));
        }
        match request.prompt {
            Some(PromptField::Text(text)) => {
                let text = take(&text, &mut prompt);
                prompt.messages.push((String::new(), None, text));
            }
            Some(PromptField::Many(texts)) => {
                for text in texts {
                    let text = take(&text, &mut prompt);
                    prompt.messages.push((String::new(), None, text));
                }
            }
            None => {}
        }
        Ok(prompt)
    }

    /// Prompt tokens: chat messages by the cookbook rule, a completions prompt as plain text.
    pub fn tokens(&self, encoding: Encoding) -> u64 {
        let mut tokens = 0;
        let mut chat = false;
        for (role, name, content) in &self.messages {
            if role.is_empty() {
                tokens += encoding.count(content);
                continue;
            }
            chat = true;
            tokens += 3 + encoding.count(role) + encoding.count(content);
            if let Some(name) = name {
                tokens += 1 + encoding.count(name);
            }
        }
        if chat {
            tokens += 3;
        }
        tokens
    }
}

/// The estimated usage of a stream: the prompt, and the output text it delivered.
pub fn estimate(model: &str, prompt: Option<&Prompt>, output: &str) -> Usage {
    let encoding = Encoding::for_model(model);
    Usage {
        input_tokens: prompt.map_or(0, |p| p.tokens(encoding)),
        output_tokens: encoding.count(output),
        ..Default::default()
    }
}

/// The largest index ≤ `max` that is a char boundary of `text`.
pub fn floor_char_boundary(text: &str, max: usize) -> usize {
    if max >= text.len() {
        return text.len();
    }
    (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_by_model() {
        assert_eq!(Encoding::for_model("gpt-4o-mini-2024-07-18"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4.1"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4-0613"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("gpt-3.5-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("mistral-large-latest"), Encoding::O200kBase);
    }

    #[test]
    fn counts_match_tiktoken() {
        // Reference counts from OpenAI's tiktoken.
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count("tiktoken is great!"), 6);
    }

    #[test]
    fn chat_prompts_follow_the_cookbook_rule() {
        let prompt = Prompt::from_request(
            br#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","name":"ann","content":[{"type":"text","text":"hello world"}]}]}"#,
        )
        .expect("prompt");
        let e = Encoding::O200kBase;
        let expected = 3
            + e.count("system")
            + e.count("Be brief.")
            + 3
            + e.count("user")
            + e.count("hello world")
            + 1
            + e.count("ann")
            + 3;
        assert_eq!(prompt.tokens(e), expected);
        let completion =
            Prompt::from_request(br#"{"model":"gpt-3.5-turbo-instruct","prompt":"hello world"}"#)
                .expect("prompt");
        assert_eq!(completion.tokens(Encoding::Cl100kBase), 2);
    }

    #[test]
    fn estimate_counts_prompt_and_output() {
        let prompt = Prompt::from_request(br#"{"messages":[{"role":"user","content":"hello world"}]}"#)
            .expect("prompt");
        let usage = estimate("gpt-4o", Some(&prompt), "hello world");
        assert_eq!(usage.input_tokens, 3 + 1 + 2 + 3);
        assert_eq!(usage.output_tokens, 2);
    }
}
