//! BPE token counting for the `max_tokens` rule of contracts.
//!
//! Encodings are loaded lazily, once per process each (loading one takes
//! ~100 ms and tens of MiB), and shared by every [`Tokenizer`] that names it.

use std::fmt;
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// The encodings [`Tokenizer::new`] knows, the default first.
const KNOWN: [&str; 4] = ["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// One cache slot per entry of [`KNOWN`], same order. A failed load is
/// cached too: the tables are compiled into the binary, so it cannot
/// succeed later.
static LOADED: [OnceLock<Result<CoreBPE, String>>; 4] = [
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
];

/// A BPE tokenizer, shared process-wide per encoding name.
///
/// Cheap to clone: it only holds a reference to the process-wide encoding.
#[derive(Clone)]
pub struct Tokenizer {
    name: &'static str,
    bpe: &'static CoreBPE,
}

impl Tokenizer {
    /// Loads an encoding by name: `o200k_base` (the default),
    /// `cl100k_base`, `p50k_base` or `r50k_base`. Any other name is an
    /// error that lists the known ones. Each encoding is loaded once per
    /// process; later calls return the cached one.
    pub fn new(encoding: &str) -> Result<Tokenizer, String> {
        let Some(index) = KNOWN.iter().position(|known| *known == encoding) else {
            return Err(format!(
                "unknown tokenizer encoding {encoding:?}; known encodings: {}",
                KNOWN.join(", ")
            ));
        };
        let name = KNOWN[index];
        match LOADED[index].get_or_init(|| load(name)) {
            Ok(bpe) => Ok(Tokenizer { name, bpe }),
            Err(e) => Err(e.clone()),
        }
    }

    /// The encoding if it is already loaded (or failed to load): `None`
    /// when [`Tokenizer::new`] would load it now, or for an unknown name.
    pub fn loaded(encoding: &str) -> Option<Result<Tokenizer, String>> {
        let index = KNOWN.iter().position(|known| *known == encoding)?;
        let name = KNOWN[index];
        LOADED[index].get().map(|loaded| match loaded {
            Ok(bpe) => Ok(Tokenizer { name, bpe }),
            Err(e) => Err(e.clone()),
        })
    }

    /// The encoding's name, e.g. `o200k_base`.
    pub fn encoding(&self) -> &str {
        self.name
    }

    /// Tokens in `text`, with special tokens (`<|endoftext|>`...) counted
    /// as plain text, like tiktoken's `encode_ordinary`.
    pub fn count(&self, text: &str) -> usize {
        if text.is_empty() {
            return 0;
        }
        self.bpe.count_ordinary(text)
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("encoding", &self.name)
            .finish_non_exhaustive()
    }
}

fn load(name: &str) -> Result<CoreBPE, String> {
    let loaded = match name {
        "o200k_base" => tiktoken_rs::o200k_base(),
        "cl100k_base" => tiktoken_rs::cl100k_base(),
        "p50k_base" => tiktoken_rs::p50k_base(),
        "r50k_base" => tiktoken_rs::r50k_base(),
        other => return Err(format!("unknown tokenizer encoding {other:?}")),
    };
    loaded.map_err(|e| format!("loading tokenizer encoding {name}: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_world_is_two_o200k_tokens() {
        let t = Tokenizer::new("o200k_base").unwrap();
        assert_eq!(t.encoding(), "o200k_base");
        assert_eq!(t.count("hello world"), 2);
        assert_eq!(t.count(""), 0);
    }

    #[test]
    fn special_tokens_count_as_plain_text() {
        let t = Tokenizer::new("cl100k_base").unwrap();
        // As ordinary text `<|endoftext|>` is several tokens, not one.
        assert!(t.count("<|endoftext|>") > 1);
    }

    #[test]
    fn every_known_encoding_loads_and_is_shared() {
        for name in KNOWN {
            let a = Tokenizer::new(name).unwrap();
            let b = Tokenizer::new(name).unwrap();
            assert_eq!(a.encoding(), name);
            assert!(std::ptr::eq(a.bpe, b.bpe), "{name} loaded twice");
            assert!(a.count("hello world") >= 2);
        }
    }

    #[test]
    fn unknown_encoding_names_the_known_ones() {
        let err = Tokenizer::new("gpt2_base").unwrap_err();
        assert!(err.contains("gpt2_base"), "{err}");
        for name in KNOWN {
            assert!(err.contains(name), "{err}");
        }
    }
}
