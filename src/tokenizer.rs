//! CLIP byte-level BPE tokenizer, read from a bundle's `tokenizer/` folder.
//!
//! The ids are those of transformers' `CLIPTokenizer` (5.x, which is backed by the
//! `tokenizers` library; there is no separate "slow" CLIP tokenizer any more) called
//! the way diffusers calls it: `tokenizer(prompt, padding="max_length",
//! max_length=model_max_length, truncation=True)`. The steps, in that library's order:
//!
//! 1. special tokens whose `normalized` flag is false are cut out of the raw text;
//! 2. the rest is normalized: NFC, every run of Unicode white space becomes one
//!    space, then each character is lower-cased on its own (so a final capital
//!    sigma becomes `σ`, not `ς`);
//! 3. special tokens whose `normalized` flag is true are cut out of the normalized text;
//! 4. the text is split with CLIP's pattern, each piece split again with the GPT-2
//!    pattern of the byte-level pre-tokenizer, and each piece's UTF-8 bytes go
//!    through BPE with `</w>` on the last symbol;
//! 5. `bos`, the first `max_length - 2` tokens, `eos`, then `pad` up to `max_length`.
//!
//! Which special tokens exist and their flags come from `tokenizer_config.json` and
//! `special_tokens_map.json` with the precedence transformers applies: SD 2.x bundles
//! use pad token `"!"`, which makes every `!` in a prompt a token of its own.
//!
//! Checked against transformers 5.24 / tokenizers 0.23 on every code point: the
//! only differences are three Unicode 16 compositions (U+113C2, U+1611E,
//! U+16D67 doubled) that `unicode-normalization` applies and the older tables
//! inside `tokenizers` do not.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

const VOCAB_FILE: &str = "vocab.json";
const MERGES_FILE: &str = "merges.txt";
const CONFIG_FILE: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";

const END_OF_WORD: &str = "</w>";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP text encoders have 77 position embeddings.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Longest sequence accepted from a config; transformers writes 1e30 when a
/// tokenizer has no limit, which no text encoder can take.
const MAX_SUPPORTED_LENGTH: usize = 4096;
/// Same bound as the `tokenizers` BPE cache: past it new words are not cached,
/// so a long-running daemon does not grow without limit.
const CACHE_CAPACITY: usize = 10_000;

/// CLIP's pre-tokenization pattern, as in transformers' `CLIPTokenizer`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's pattern, which the byte-level pre-tokenizer applies to every CLIP piece.
/// CLIP pieces hold no white space, so its white-space alternatives and optional
/// leading spaces are left out. In practice this only splits the literal
/// `<|startoftext|>` / `<|endoftext|>` text that was not taken as a special token.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// Special-token attributes in the order transformers registers them; when two
/// share the same text, the later one's flags win.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A token matched in the text before BPE (bos, eos, pad, ...).
#[derive(Debug, Clone, PartialEq)]
struct AddedToken {
    content: String,
    /// Matched after normalization (lower-casing etc.) instead of on the raw text.
    normalized: bool,
}

/// A special token as written in a config file, before ids are resolved.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    normalized: bool,
}

/// Special tokens and sequence length, gathered from the optional config files.
#[derive(Debug)]
struct SpecialTokensConfig {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    /// Every special token, in registration order (later entries win on equal text).
    added: Vec<TokenSpec>,
    max_length: usize,
}

/// One BPE merge: the rank decides the order, `merged` is the resulting id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MergeRule {
    rank: u32,
    merged: u32,
}

/// CLIP tokenizer; cheap to share between threads (`encode` takes `&self`).
pub struct ClipTokenizer {
    vocab_size: usize,
    merges: HashMap<(u32, u32), MergeRule>,
    /// Id of each byte's symbol inside a word, and at the end of a word (`</w>`).
    byte_ids: [Option<u32>; 256],
    byte_end_ids: [Option<u32>; 256],
    bos_id: u32,
    eos_id: u32,
    unk_id: Option<u32>,
    pad_id: u32,
    raw_added: Vec<(AddedToken, u32)>,
    normalized_added: Vec<(AddedToken, u32)>,
    max_length: usize,
    clip_pattern: Regex,
    byte_level_pattern: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads `vocab.json` and `merges.txt`, plus `tokenizer_config.json` and
    /// `special_tokens_map.json` when present (pad token, sequence length).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = read_vocab(&dir.join(VOCAB_FILE))?;
        let merges = read_merges(&dir.join(MERGES_FILE), &vocab)?;
        let config = read_special_tokens(dir)?;
        let (byte_ids, byte_end_ids) = byte_symbol_ids(&vocab);

        let id_of = |content: &str, role: &str| -> Result<u32> {
            vocab.get(content).copied().ok_or_else(|| {
                anyhow!(
                    "{role} {content:?} named in {} is not in {}",
                    dir.display(),
                    dir.join(VOCAB_FILE).display()
                )
            })
        };
        let bos_id = id_of(&config.bos, "bos token")?;
        let eos_id = id_of(&config.eos, "eos token")?;
        let pad_id = id_of(&config.pad, "pad token")?;
        let unk_id = vocab.get(&config.unk).copied();
        if unk_id.is_none() {
            log::warn!(
                "unk token {:?} is not in {}; bytes missing from the vocabulary will be dropped",
                config.unk,
                dir.join(VOCAB_FILE).display()
            );
        }

        let mut raw_added = Vec::new();
        let mut normalized_added = Vec::new();
        for (token, id) in resolve_added_tokens(&config.added, |c| id_of(c, "special token"))? {
            if token.normalized {
                normalized_added.push((token, id));
            } else {
                raw_added.push((token, id));
            }
        }

        log::debug!(
            "loaded CLIP tokenizer from {}: {} tokens, {} merges, pad {:?}, max length {}",
            dir.display(),
            vocab.len(),
            merges.len(),
            config.pad,
            config.max_length
        );
        Ok(Self {
            vocab_size: vocab.len(),
            merges,
            byte_ids,
            byte_end_ids,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            raw_added,
            normalized_added,
            max_length: config.max_length,
            clip_pattern: Regex::new(CLIP_PATTERN).context("compiling the CLIP split pattern")?,
            byte_level_pattern: Regex::new(BYTE_LEVEL_PATTERN)
                .context("compiling the byte-level split pattern")?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Sequence length of every encoding (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Number of entries in `vocab.json`; every id is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Exactly `max_length` ids: bos, the prompt's tokens (truncated), eos, padding.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let budget = self.max_length - 2;
        let mut tokens = Vec::with_capacity(budget);
        self.tokenize_into(text, budget, &mut tokens);
        tokens.truncate(budget);

        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(i64::from(self.bos_id));
        ids.extend(tokens.iter().map(|&id| i64::from(id)));
        ids.push(i64::from(self.eos_id));
        ids.resize(self.max_length, i64::from(self.pad_id));
        ids
    }

    /// Appends the prompt's token ids to `out`, stopping once `budget` are there
    /// (the rest would be truncated anyway, and a huge prompt should cost nothing).
    fn tokenize_into(&self, text: &str, budget: usize, out: &mut Vec<u32>) {
        for raw in split_on_added(text, &self.raw_added) {
            let raw_text = match raw {
                Segment::Added(id) => {
                    out.push(id);
                    continue;
                }
                Segment::Text(t) => t,
            };
            let normalized = normalize(raw_text);
            for segment in split_on_added(&normalized, &self.normalized_added) {
                match segment {
                    Segment::Added(id) => out.push(id),
                    Segment::Text(t) => self.tokenize_words(t, budget, out),
                }
                if out.len() >= budget {
                    return;
                }
            }
        }
    }

    /// Pre-tokenizes normalized text and runs BPE on every piece.
    fn tokenize_words(&self, text: &str, budget: usize, out: &mut Vec<u32>) {
        for clip_piece in self.clip_pattern.find_iter(text) {
            for word in split_keeping_gaps(&self.byte_level_pattern, clip_piece.as_str()) {
                self.bpe_cached(word, out);
                if out.len() >= budget {
                    return;
                }
            }
        }
    }

    fn bpe_cached(&self, word: &str, out: &mut Vec<u32>) {
        // A poisoned lock only means another thread panicked mid-insert; skip the cache then.
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() < CACHE_CAPACITY {
                cache.insert(word.to_owned(), ids);
            }
        }
    }

    /// Byte-level BPE of one word, with the merge order of the `tokenizers` library:
    /// always the lowest-ranked pair, leftmost first.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let bytes = word.as_bytes();
        let mut symbols: Vec<Symbol> = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            let id = if i + 1 == bytes.len() {
                self.byte_end_ids[usize::from(b)]
            } else {
                self.byte_ids[usize::from(b)]
            };
            // Unknown symbols become unk, one per byte (no fusing), as in `tokenizers`.
            if let Some(id) = id.or(self.unk_id) {
                symbols.push(Symbol::new(id, symbols.len()));
            }
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        merge_all(&mut symbols, &self.merges);
        symbols
            .iter()
            .filter(|s| !s.removed)
            .map(|s| s.id)
            .collect()
    }
}

/// A symbol of a word during BPE; merged symbols stay in place, marked removed.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    removed: bool,
}

impl Symbol {
    fn new(id: u32, pos: usize) -> Self {
        Self {
            id,
            prev: pos.checked_sub(1),
            next: Some(pos + 1),
            removed: false,
        }
    }
}

/// A candidate merge of the symbol at `pos` with its right neighbour.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    rank: u32,
    pos: usize,
    merged: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.rank, self.pos).cmp(&(other.rank, other.pos))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Applies merges until none applies. A heap of candidates keeps this
/// O(n log n), so one enormous word cannot stall the worker.
fn merge_all(symbols: &mut [Symbol], merges: &HashMap<(u32, u32), MergeRule>) {
    let candidate = |symbols: &[Symbol], pos: usize| -> Option<Reverse<Candidate>> {
        let next = symbols[pos].next?;
        let rule = merges.get(&(symbols[pos].id, symbols[next].id))?;
        Some(Reverse(Candidate {
            rank: rule.rank,
            pos,
            merged: rule.merged,
        }))
    };
    let mut queue: BinaryHeap<Reverse<Candidate>> = (0..symbols.len())
        .filter_map(|pos| candidate(symbols, pos))
        .collect();

    while let Some(Reverse(top)) = queue.pop() {
        let left = &symbols[top.pos];
        let Some(next) = left.next.filter(|_| !left.removed) else {
            continue;
        };
        // Skip entries made stale by an earlier merge on either side.
        let current = merges.get(&(left.id, symbols[next].id));
        if current.map(|rule| rule.merged) != Some(top.merged) {
            continue;
        }
        let after = symbols[next].next;
        symbols[top.pos].id = top.merged;
        symbols[top.pos].next = after;
        symbols[next].removed = true;
        if let Some(after) = after {
            symbols[after].prev = Some(top.pos);
        }
        if let Some(prev) = symbols[top.pos].prev {
            queue.extend(candidate(symbols, prev));
        }
        queue.extend(candidate(symbols, top.pos));
    }
}

/// A stretch of text, or a special token found in it.
#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Cuts special tokens out of `text`: the leftmost match wins, the longest among
/// those starting at the same place (aho-corasick "leftmost longest", as `tokenizers`).
fn split_on_added<'a>(text: &'a str, tokens: &[(AddedToken, u32)]) -> Vec<Segment<'a>> {
    if tokens.is_empty() {
        return vec![Segment::Text(text)];
    }
    let mut segments = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let found = tokens
            .iter()
            .filter(|(token, _)| rest.starts_with(token.content.as_str()))
            .max_by_key(|(token, _)| token.content.len());
        match found {
            Some((token, id)) => {
                if start < pos {
                    segments.push(Segment::Text(&text[start..pos]));
                }
                segments.push(Segment::Added(*id));
                pos += token.content.len();
                start = pos;
            }
            None => pos += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        segments.push(Segment::Text(&text[start..]));
    }
    segments
}

/// The `tokenizers` normalizer of CLIP: NFC, white-space runs to one space, lower case.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            // Character by character on purpose: `str::to_lowercase` would apply
            // the final-sigma rule, which the reference tokenizer does not.
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Splits on `pattern`, keeping the text between matches as pieces too.
fn split_keeping_gaps<'a>(pattern: &Regex, text: &'a str) -> Vec<&'a str> {
    let mut pieces = Vec::new();
    let mut last = 0;
    for m in pattern.find_iter(text) {
        if m.start() > last {
            pieces.push(&text[last..m.start()]);
        }
        pieces.push(m.as_str());
        last = m.end();
    }
    if last < text.len() {
        pieces.push(&text[last..]);
    }
    pieces
}

/// GPT-2/CLIP table mapping each byte to a printable character.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let code = if printable(b) {
            u32::from(b)
        } else {
            shifted += 1;
            255 + shifted
        };
        // Every code here is below 0x200, a valid scalar value.
        table[usize::from(b)] = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

type ByteIds = [Option<u32>; 256];

fn byte_symbol_ids(vocab: &HashMap<String, u32>) -> (ByteIds, ByteIds) {
    let mut inner = [None; 256];
    let mut end = [None; 256];
    for (b, c) in bytes_to_unicode().iter().enumerate() {
        inner[b] = vocab.get(c.to_string().as_str()).copied();
        end[b] = vocab.get(format!("{c}{END_OF_WORD}").as_str()).copied();
    }
    (inner, end)
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let text = read_text(path)?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&text).with_context(|| {
        format!(
            "parsing {}: expected a JSON object mapping each token to its id (a non-negative integer)",
            path.display()
        )
    })?;
    if vocab.is_empty() {
        bail!("{} holds no tokens", path.display());
    }
    Ok(vocab)
}

/// Reads merges as `tokenizers` does: `#version` lines are skipped, every other
/// line is two tokens separated by one space, ranked by their order. Blank lines
/// are skipped too (that library rejects them).
fn read_merges(
    path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<HashMap<(u32, u32), MergeRule>> {
    let text = read_text(path)?;
    let mut merges = HashMap::new();
    let mut rank = 0u32;
    for (index, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let line_no = index + 1;
        let (left, right) = match line.split(' ').collect::<Vec<_>>()[..] {
            [left, right] => (left, right),
            _ => bail!(
                "{} line {line_no}: expected two tokens separated by one space, found {line:?}",
                path.display()
            ),
        };
        let id_of = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                anyhow!(
                    "{} line {line_no}: token {token:?} is not in {VOCAB_FILE}",
                    path.display()
                )
            })
        };
        let pair = (id_of(left)?, id_of(right)?);
        let merged = id_of(&format!("{left}{right}"))?;
        merges.insert(pair, MergeRule { rank, merged });
        rank += 1;
    }
    Ok(merges)
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    match serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))? {
        Value::Object(map) => Ok(Some(map)),
        _ => bail!("{}: expected a JSON object", path.display()),
    }
}

/// A special token value: a plain string, or an object with `content` and flags.
/// `normalized_default` applies when an object has no `normalized` field.
fn parse_token_spec(
    value: &Value,
    normalized_default: bool,
    what: &str,
    file: &Path,
) -> Result<Option<TokenSpec>> {
    match value {
        Value::Null => Ok(None),
        // Plain strings become special tokens matched on the raw text.
        Value::String(s) => Ok(Some(TokenSpec {
            content: s.clone(),
            normalized: false,
        })),
        Value::Object(map) => {
            let content = map.get("content").and_then(Value::as_str).ok_or_else(|| {
                anyhow!("{}: {what} has no string \"content\" field", file.display())
            })?;
            for flag in ["lstrip", "rstrip", "single_word"] {
                if map.get(flag).and_then(Value::as_bool) == Some(true) {
                    log::warn!(
                        "{}: {what} sets {flag}, which is not supported and is ignored",
                        file.display()
                    );
                }
            }
            let normalized = match map.get("normalized") {
                Some(Value::Bool(b)) => *b,
                _ => normalized_default,
            };
            Ok(Some(TokenSpec {
                content: content.to_owned(),
                normalized,
            }))
        }
        _ => bail!(
            "{}: {what} must be a string or an object with \"content\"",
            file.display()
        ),
    }
}

/// Gathers special tokens and the sequence length with transformers' rules:
/// with `added_tokens_decoder` in `tokenizer_config.json`, that file alone is used
/// and named tokens take their flags from the decoder entries; without it
/// (older bundles), `special_tokens_map.json` overrides `tokenizer_config.json`.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokensConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let map_path = dir.join(SPECIAL_TOKENS_FILE);
    let config = read_json_object(&config_path)?.unwrap_or_default();

    let mut named: HashMap<&str, TokenSpec> = HashMap::new();
    let mut added: Vec<TokenSpec> = Vec::new();
    let decoder = config.get("added_tokens_decoder");

    // Values in tokenizer_config.json that are objects are `AddedToken`s
    // whose `normalized` defaults to true when absent.
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(value) = config.get(key) {
            if let Some(spec) = parse_token_spec(value, true, key, &config_path)? {
                named.insert(key, spec);
            }
        }
    }

    if let Some(decoder) = decoder {
        let entries = decoder.as_object().ok_or_else(|| {
            anyhow!(
                "{}: added_tokens_decoder must be an object",
                config_path.display()
            )
        })?;
        let mut by_id: Vec<(u64, TokenSpec)> = Vec::new();
        for (id, value) in entries {
            let id = id.parse::<u64>().with_context(|| {
                format!(
                    "{}: added_tokens_decoder key {id:?} is not an id",
                    config_path.display()
                )
            })?;
            let what = format!("added_tokens_decoder[{id}]");
            if let Some(spec) = parse_token_spec(value, false, &what, &config_path)? {
                by_id.push((id, spec));
            }
        }
        by_id.sort_by_key(|(id, _)| *id);
        added.extend(by_id.into_iter().map(|(_, spec)| spec));
        // Named tokens given by text take the decoder's flags for that text.
        for spec in named.values_mut() {
            if let Some(known) = added.iter().rev().find(|a| a.content == spec.content) {
                spec.normalized = known.normalized;
            }
        }
    } else if let Some(map) = read_json_object(&map_path)? {
        // special_tokens_map.json objects are special tokens: `normalized` defaults to false.
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(value) = map.get(key) {
                if let Some(spec) = parse_token_spec(value, false, key, &map_path)? {
                    named.insert(key, spec);
                }
            }
        }
    }

    let take = |key: &str, default: &str| {
        named.get(key).map_or_else(
            || TokenSpec {
                content: default.to_owned(),
                normalized: false,
            },
            Clone::clone,
        )
    };
    // CLIPTokenizer's defaults when a bundle names none.
    let bos = take("bos_token", DEFAULT_BOS);
    let eos = take("eos_token", DEFAULT_EOS);
    let unk = take("unk_token", DEFAULT_EOS);
    let pad = take("pad_token", DEFAULT_EOS);
    let mut ordered = vec![bos.clone(), eos.clone(), unk.clone()];
    ordered.extend(named.get("sep_token").cloned());
    ordered.push(pad.clone());
    ordered.extend(named.get("cls_token").cloned());
    ordered.extend(named.get("mask_token").cloned());
    added.extend(ordered);

    Ok(SpecialTokensConfig {
        bos: bos.content,
        eos: eos.content,
        unk: unk.content,
        pad: pad.content,
        added,
        max_length: read_max_length(&config, &config_path)?,
    })
}

fn read_max_length(config: &Map<String, Value>, path: &Path) -> Result<usize> {
    let Some(value) = config.get("model_max_length") else {
        log::warn!(
            "{} has no model_max_length; using CLIP's {DEFAULT_MAX_LENGTH}",
            path.display()
        );
        return Ok(DEFAULT_MAX_LENGTH);
    };
    match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) if (2..=MAX_SUPPORTED_LENGTH).contains(&n) => Ok(n),
        _ => bail!(
            "{}: model_max_length {value} is not a usable sequence length (2..={MAX_SUPPORTED_LENGTH})",
            path.display()
        ),
    }
}

/// Registers special tokens in order; a later entry with the same text replaces
/// the earlier one's flags (as `tokenizers`' added vocabulary does).
fn resolve_added_tokens(
    specs: &[TokenSpec],
    id_of: impl Fn(&str) -> Result<u32>,
) -> Result<Vec<(AddedToken, u32)>> {
    let mut tokens: Vec<(AddedToken, u32)> = Vec::new();
    for spec in specs.iter().filter(|s| !s.content.is_empty()) {
        let token = AddedToken {
            content: spec.content.clone(),
            normalized: spec.normalized,
        };
        match tokens.iter_mut().find(|(t, _)| t.content == spec.content) {
            Some(existing) => existing.0 = token,
            None => {
                let id = id_of(&spec.content)?;
                tokens.push((token, id));
            }
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_clip() {
        let table = bytes_to_unicode();
        assert_eq!(table[usize::from(b'!')], '!');
        assert_eq!(table[0], 'Ā'); // U+0100
        assert_eq!(table[usize::from(b' ')], 'Ġ'); // U+0120
        assert_eq!(table[0xAD], 'Ń'); // U+0143
    }

    #[test]
    fn normalize_collapses_space_and_lowercases_per_char() {
        assert_eq!(normalize("A\t\n B\u{3000}C"), "a b c");
        assert_eq!(normalize("ΟΔΟΣ"), "οδοσ");
        assert_eq!(normalize("Cafe\u{301}"), "café");
    }

    #[test]
    fn added_tokens_split_leftmost_longest() {
        let tokens = vec![
            (
                AddedToken {
                    content: "<a>".into(),
                    normalized: false,
                },
                1,
            ),
            (
                AddedToken {
                    content: "<a>b".into(),
                    normalized: false,
                },
                2,
            ),
        ];
        let segments = split_on_added("x<a>b<a>", &tokens);
        assert_eq!(
            segments,
            vec![Segment::Text("x"), Segment::Added(2), Segment::Added(1)]
        );
    }
}
