use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::Theorem;

/// A theorem file that cannot be used, with the place to fix it.
///
/// Displays as `FILE:LINE: message` (like a compiler) so editors can jump to the line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// Reads theorem records one line at a time, so a large file is never held in memory twice.
///
/// Blank lines are skipped; a UTF-8 byte-order mark on the first line and `\r\n` line ends are
/// accepted. Every other deviation is an error naming the line and, where there is one, the field.
pub struct TheoremReader<R> {
    path: PathBuf,
    reader: R,
    line: usize,
    buf: Vec<u8>,
}

impl TheoremReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::new(path, BufReader::new(file)))
    }
}

impl<R: BufRead> TheoremReader<R> {
    /// `path` is only used in messages.
    pub fn new(path: &Path, reader: R) -> Self {
        Self {
            path: path.to_owned(),
            reader,
            line: 0,
            buf: Vec::new(),
        }
    }

    fn error(&self, message: impl Into<String>) -> LoadError {
        LoadError::Line {
            path: self.path.clone(),
            line: self.line,
            message: message.into(),
        }
    }

    fn parse_line(&self, bytes: &[u8]) -> Result<Theorem, LoadError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            self.error(format!(
                "invalid UTF-8 at byte {} of the line; theorem files must be UTF-8",
                e.valid_up_to() + 1
            ))
        })?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| self.error(format!("invalid JSON: {e}")))?;
        let Value::Object(record) = value else {
            return Err(self.error(format!(
                "expected a JSON object (one theorem record per line), found {}",
                json_kind(&value)
            )));
        };
        self.record(&record)
    }

    fn record(&self, record: &Map<String, Value>) -> Result<Theorem, LoadError> {
        let name = self.required_string(record, "name")?;
        let statement = self.required_string(record, "statement")?;
        let statement = normalise_statement(&statement);
        let imports = match record.get("imports") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.error(format!(
                        "field \"imports\" must be an array of module names, found an array holding {}",
                        json_kind(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(self.error(format!(
                    "field \"imports\" must be an array of module names, found {}",
                    json_kind(other)
                )))
            }
        };
        Ok(Theorem {
            name,
            statement,
            context: self.optional_string(record, "context")?,
            imports,
            header: self.optional_string(record, "header")?,
            proof: self.optional_string(record, "proof")?,
            split: self.optional_string(record, "split")?,
            hole: None,
        })
    }

    fn required_string(
        &self,
        record: &Map<String, Value>,
        field: &str,
    ) -> Result<String, LoadError> {
        match self.optional_string(record, field)? {
            None => Err(self.error(format!("missing field \"{field}\""))),
            Some(s) if s.trim().is_empty() => {
                Err(self.error(format!("field \"{field}\" is empty")))
            }
            Some(s) => Ok(s),
        }
    }

    fn optional_string(
        &self,
        record: &Map<String, Value>,
        field: &str,
    ) -> Result<Option<String>, LoadError> {
        match record.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(format!(
                "field \"{field}\" must be a string, found {}",
                json_kind(other)
            ))),
        }
    }
}

impl<R: BufRead> Iterator for TheoremReader<R> {
    type Item = Result<Theorem, LoadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => {
                    return Some(Err(LoadError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
            }
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            if self.line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let bytes = bytes.to_vec();
            return Some(self.parse_line(&bytes));
        }
    }
}

/// Loads every record of a theorem file, keeping those of `split` when given.
///
/// Fails on the first bad line, on a duplicate name (both lines named), on a file without
/// records, and on a split that no record has (the splits present are listed).
pub fn load_theorems(path: &Path, split: Option<&str>) -> Result<Vec<Theorem>, LoadError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut theorems = Vec::new();
    let mut splits: Vec<String> = Vec::new();
    let mut reader = TheoremReader::open(path)?;
    while let Some(theorem) = reader.next() {
        let theorem = theorem?;
        if let Some(first) = seen.insert(theorem.name.clone(), reader.line) {
            return Err(reader.error(format!(
                "duplicate theorem name \"{}\" (first defined on line {first}); names must be unique",
                theorem.name
            )));
        }
        let theorem_split = theorem.split.clone().unwrap_or_default();
        if !splits.contains(&theorem_split) {
            splits.push(theorem_split.clone());
        }
        if split.is_none_or(|wanted| wanted == theorem_split) {
            theorems.push(theorem);
        }
    }
    if seen.is_empty() {
        return Err(LoadError::File {
            path: path.to_owned(),
            message: "no theorem records (the file is empty); expected one JSON object per line"
                .into(),
        });
    }
    if theorems.is_empty() {
        let listed: Vec<String> = splits
            .iter()
            .map(|s| {
                if s.is_empty() {
                    "(none)".to_string()
                } else {
                    format!("\"{s}\"")
                }
            })
            .collect();
        return Err(LoadError::File {
            path: path.to_owned(),
            message: format!(
                "no record has split \"{}\"; splits in this file: {}",
                split.unwrap_or_default(),
                listed.join(", ")
            ),
        });
    }
    Ok(theorems)
}

/// Gives every statement the shape `... :=`. The seed project's records stop before `:=`.
fn normalise_statement(statement: &str) -> String {
    let trimmed = statement.trim_end();
    if trimmed.ends_with(":=") {
        trimmed.to_string()
    } else {
        format!("{trimmed} :=")
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
