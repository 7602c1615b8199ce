//! `lean-grpo prepare`: public Lean 4 theorem datasets (JSONL, a JSON array, or the Parquet files
//! Hugging Face ships) to our theorem JSONL, record by record, with the reason for every record
//! left out. Field names are the datasets' own (docs/data.md lists them, with their sources).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Map, Value};

use super::Theorem;

/// The layouts `prepare` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Our own theorem JSONL (`name`, `statement`, `header`, `proof`, `split`): checked and
    /// copied unchanged.
    LeanGrpo,
    /// yangky11/miniF2F-lean4: `name`, `header`, `formal_statement` (`:= sorry`),
    /// `formal_proof`, `split`.
    Minif2fLean4,
    /// DeepSeek-Prover's `minif2f.jsonl`: `name`, `header`, `formal_statement` (`:= by`),
    /// `informal_prefix`, `goal`, `split`.
    DeepseekMinif2f,
    /// internlm/Lean-Workbook: `formal_statement` (`:= by sorry`), `proof` (tactic scripts),
    /// `split`; the name is the theorem's own.
    LeanWorkbook,
    /// Goedel-LM/Goedel-Pset: `problem_id`, `formal_statement` (imports included).
    GoedelPset,
    /// AI-MO NuminaMath-LEAN, Kimina-Prover-Promptset and minif2f_test: `uuid`, `statement_id`
    /// or `name`; `formal_statement` with its imports; `formal_ground_truth` when complete.
    Numina,
    /// m-a-p/FineLeanCorpus: `id`, `lean_code` (imports included).
    Fineleancorpus,
}

/// Why a record was left out, with where it was.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// `FILE:LINE` for JSONL, `FILE[INDEX]` for a JSON array, `FILE row N` for Parquet.
    pub at: String,
    pub reason: String,
}

/// What `prepare` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrepareReport {
    pub read: usize,
    pub written: usize,
    pub skipped: Vec<Skipped>,
    /// Records whose statement repeated an earlier one (whitespace aside): the later is dropped.
    pub duplicates: Vec<Skipped>,
}

/// Options beyond the format.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Give every record a `split`: `test` for about this share, `train` for the rest.
    pub split_ratio: Option<f64>,
    pub seed: u64,
    /// Keep this many records, drawn by `seed`.
    pub limit: Option<usize>,
}

/// Reads `input` in `format` and returns the converted records with the report.
pub fn prepare(
    input: &Path,
    format: Format,
    options: &PrepareOptions,
) -> Result<(Vec<Theorem>, PrepareReport)> {
    if let Some(r) = options.split_ratio {
        if !(0.0..=1.0).contains(&r) {
            bail!("--split-ratio {r}: the share of test records must lie in 0..=1");
        }
    }
    let rows = read_rows(input)?;
    let mut report = PrepareReport {
        read: rows.len(),
        ..PrepareReport::default()
    };
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for (at, row) in rows {
        let theorem = match convert(format, &row) {
            Ok(t) => t,
            Err(reason) => {
                report.skipped.push(Skipped { at, reason });
                continue;
            }
        };
        let key = theorem
            .statement
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(first) = seen.get(&key) {
            let reason = format!("the same statement as {first}");
            report.duplicates.push(Skipped { at, reason });
            continue;
        }
        if let Some(first) = names.get(&theorem.name) {
            let reason = format!("the name `{}` is taken by {first}", theorem.name);
            report.skipped.push(Skipped { at, reason });
            continue;
        }
        seen.insert(key, at.clone());
        names.insert(theorem.name.clone(), at);
        out.push(theorem);
    }
    if let Some(limit) = options.limit {
        out = sample(out, limit, options.seed);
    }
    if let Some(ratio) = options.split_ratio {
        for t in &mut out {
            let test = unit(&t.name, options.seed) < ratio;
            t.split = Some(if test { "test" } else { "train" }.to_string());
        }
    }
    report.written = out.len();
    Ok((out, report))
}

/// Every record of `input` with where it was; JSONL, a JSON array (`.json`) or Parquet.
fn read_rows(input: &Path) -> Result<Vec<(String, Map<String, Value>)>> {
    let name = input.display().to_string();
    let ext = input
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => read_parquet(input),
        "json" => {
            let text =
                std::fs::read_to_string(input).with_context(|| format!("cannot read {name}"))?;
            let value: Value =
                serde_json::from_str(&text).with_context(|| format!("{name}: invalid JSON"))?;
            let Value::Array(items) = value else {
                bail!("{name}: expected a JSON array of records (or name the file .jsonl)");
            };
            Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{name}[{i}]"), object(v)))
                .collect())
        }
        _ => {
            let file = File::open(input).with_context(|| format!("cannot read {name}"))?;
            let mut rows = Vec::new();
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.with_context(|| format!("reading {name}"))?;
                if line.trim().is_empty() {
                    continue;
                }
                let at = format!("{name}:{}", i + 1);
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => rows.push((at, object(v))),
                    Err(e) => bail!("{at}: invalid JSON: {e}"),
                }
            }
            Ok(rows)
        }
    }
}

fn read_parquet(input: &Path) -> Result<Vec<(String, Map<String, Value>)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let name = input.display().to_string();
    let file = File::open(input).with_context(|| format!("cannot read {name}"))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{name} is not a Parquet file"))?;
    let mut rows = Vec::new();
    for (i, row) in reader
        .get_row_iter(None)
        .with_context(|| format!("reading {name}"))?
        .enumerate()
    {
        let row = row.with_context(|| format!("{name} row {}: unreadable", i + 1))?;
        rows.push((format!("{name} row {}", i + 1), object(row.to_json_value())));
    }
    Ok(rows)
}

/// A record as a map; anything else becomes an empty one, which every format then refuses.
fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// One record of `format` as a theorem, or why not.
fn convert(format: Format, row: &Map<String, Value>) -> Result<Theorem, String> {
    let text = |field: &str| -> Result<Option<String>, String> {
        match row.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(format!("field `{field}` must be a string, found {other}")),
        }
    };
    let required = |field: &str| text(field)?.ok_or(format!("missing field `{field}`"));
    match format {
        Format::LeanGrpo => {
            let theorem: Theorem = serde_json::from_value(Value::Object(row.clone()))
                .map_err(|e| format!("not a theorem record: {e}"))?;
            if !theorem.statement.trim_end().ends_with(":=") {
                return Err("`statement` must end with `:=`".into());
            }
            Ok(theorem)
        }
        Format::Minif2fLean4 | Format::DeepseekMinif2f => {
            let (header, statement) = split_file(&required("formal_statement")?)?;
            let header = join_headers(text("header")?, header);
            let proof = match format {
                Format::Minif2fLean4 => text("formal_proof")?,
                _ => None,
            };
            build(required("name")?, statement, header, proof, text("split")?)
        }
        Format::LeanWorkbook => {
            let (header, statement) = split_file(&required("formal_statement")?)?;
            let name = declared_name(&statement)?;
            let proof = match row.get("proof") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|p| !p.trim().is_empty())
                    .map(|p| format!("by\n  {}", p.trim().replace('\n', "\n  "))),
                _ => None,
            };
            let header = header.or_else(|| Some("import Mathlib\n".to_string()));
            build(name, statement, header, proof, text("split")?)
        }
        Format::GoedelPset | Format::Numina | Format::Fineleancorpus => {
            let (id_fields, statement_field): (&[&str], &str) = match format {
                Format::GoedelPset => (&["problem_id"], "formal_statement"),
                Format::Numina => (&["uuid", "statement_id", "name"], "formal_statement"),
                _ => (&["id"], "lean_code"),
            };
            let name = id_fields
                .iter()
                .find_map(|f| text(f).transpose())
                .transpose()?
                .ok_or(format!("missing field `{}`", id_fields.join("` or `")))?;
            let file = required(statement_field)?;
            let (header, statement) = split_file(&file)?;
            let proof = match (format, text("ground_truth_type")?.as_deref()) {
                (Format::Numina, Some("complete")) => {
                    text("formal_ground_truth")?.and_then(|truth| proof_after(&truth, &statement))
                }
                _ => None,
            };
            build(name, statement, header, proof, None)
        }
    }
}

fn build(
    name: String,
    statement: String,
    header: Option<String>,
    proof: Option<String>,
    split: Option<String>,
) -> Result<Theorem, String> {
    Ok(Theorem {
        name,
        statement,
        context: None,
        imports: Vec::new(),
        header,
        proof: proof.filter(|p| !p.trim().is_empty() && p.trim() != "sorry"),
        split,
        hole: None,
    })
}

/// Splits a Lean file holding one theorem into what comes before its declaration (imports,
/// `open`, options) and the statement cut to end with `:=` (a trailing `by`, `sorry` or
/// `by sorry` is the placeholder proof, not part of the statement).
fn split_file(file: &str) -> Result<(Option<String>, String), String> {
    let starts: Vec<usize> = line_starts(file)
        .filter(|&i| is_declaration(&file[i..]))
        .collect();
    let start = match starts.as_slice() {
        [] => return Err("no `theorem` or `lemma` declaration in the statement".into()),
        [one] => *one,
        many => {
            return Err(format!(
                "{} declarations in one record; a record must hold one theorem",
                many.len()
            ))
        }
    };
    // A doc comment directly above the declaration belongs to it.
    let start = file[..start]
        .rfind("/--")
        .filter(|&doc| {
            file[doc..start].contains("-/") && file[doc..start].trim_end().ends_with("-/")
        })
        .unwrap_or(start);
    let header = Some(file[..start].to_string()).filter(|h| !h.trim().is_empty());
    let mut statement = file[start..].trim_end().to_string();
    for placeholder in ["sorry", "by"] {
        if let Some(rest) = statement.strip_suffix(placeholder) {
            statement = rest.trim_end().to_string();
        }
    }
    if !statement.ends_with(":=") {
        return Err("the statement does not end with `:=` (or `:= by`, `:= sorry`)".into());
    }
    Ok((header, statement))
}

fn line_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1))
}

/// Whether the line at the start of `text` declares a theorem.
fn is_declaration(text: &str) -> bool {
    let line = text.split('\n').next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or_default();
    let keyword = match first {
        "private" | "protected" | "nonrec" | "noncomputable" => words.next().unwrap_or_default(),
        _ => first,
    };
    matches!(keyword, "theorem" | "lemma")
}

/// The name a statement declares (`theorem NAME ...`).
fn declared_name(statement: &str) -> Result<String, String> {
    let mut words = statement.split_whitespace();
    while let Some(w) = words.next() {
        if w == "theorem" || w == "lemma" {
            if let Some(name) = words.next() {
                return Ok(name.to_string());
            }
        }
    }
    Err("the statement declares no name".into())
}

/// `a` then `b`, each when present, as one header.
fn join_headers(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(format!("{}\n{}", a.trim_end(), b)),
        (a, b) => a.or(b),
    }
}

/// The proof in a whole Lean file whose statement is `statement` (what follows its `:=`).
fn proof_after(file: &str, statement: &str) -> Option<String> {
    let (_, rest) = file.split_once(statement)?;
    let proof = rest.trim();
    Some(proof.to_string()).filter(|p| !p.is_empty())
}

/// A seeded number in [0, 1) for `key`: the same record gets the same split in every run,
/// whatever order the file lists it in.
fn unit(key: &str, seed: u64) -> f64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{seed}:{key}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// `limit` records drawn by `seed`, in their file order.
fn sample(records: Vec<Theorem>, limit: usize, seed: u64) -> Vec<Theorem> {
    if records.len() <= limit {
        return records;
    }
    let mut ranked: Vec<(f64, usize)> = records
        .iter()
        .enumerate()
        .map(|(i, t)| (unit(&t.name, seed ^ 0x51), i))
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut keep: Vec<usize> = ranked[..limit].iter().map(|&(_, i)| i).collect();
    keep.sort_unstable();
    let mut records: Vec<Option<Theorem>> = records.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| records[i].take()).collect()
}

impl PrepareReport {
    /// The summary `prepare` prints: counts, then each reason with how many records had it
    /// and where the first was.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} read, {} written, {} skipped, {} duplicate statements dropped\n",
            self.read,
            self.written,
            self.skipped.len(),
            self.duplicates.len()
        );
        for s in self.skipped.iter().chain(&self.duplicates).take(20) {
            out.push_str(&format!("  {}: {}\n", s.at, s.reason));
        }
        let more = (self.skipped.len() + self.duplicates.len()).saturating_sub(20);
        if more > 0 {
            out.push_str(&format!("  … and {more} more\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_proofs_are_cut_and_headers_split_off() {
        let (header, statement) =
            split_file("import Mathlib\n\ntheorem t (n : ℕ) : n + 0 = n  :=  by sorry").unwrap();
        assert_eq!(header.as_deref(), Some("import Mathlib\n\n"));
        assert_eq!(statement, "theorem t (n : ℕ) : n + 0 = n  :=");
        let (_, s) = split_file("theorem t : True := by\n").unwrap();
        assert_eq!(s, "theorem t : True :=");
        let (_, s) = split_file("theorem t : True := sorry").unwrap();
        assert_eq!(s, "theorem t : True :=");
        let err = split_file("theorem a : True := sorry\ntheorem b : True := sorry").unwrap_err();
        assert!(err.contains("2 declarations"), "{err}");
        assert!(split_file("import Mathlib\n").is_err());
        assert!(split_file("theorem t : True").is_err());
    }

    #[test]
    fn splits_and_samples_depend_on_the_seed_not_the_order() {
        let t = |n: &str| Theorem {
            name: n.into(),
            statement: format!("theorem {n} : True :="),
            context: None,
            imports: Vec::new(),
            header: None,
            proof: None,
            split: None,
            hole: None,
        };
        let all: Vec<Theorem> = (0..50).map(|i| t(&format!("t{i}"))).collect();
        let reversed: Vec<Theorem> = all.iter().rev().cloned().collect();
        let names = |v: Vec<Theorem>| {
            let mut n: Vec<String> = v.into_iter().map(|t| t.name).collect();
            n.sort();
            n
        };
        assert_eq!(
            names(sample(all.clone(), 10, 3)),
            names(sample(reversed, 10, 3))
        );
        assert_ne!(names(sample(all.clone(), 10, 3)), names(sample(all, 10, 4)));
    }
}
