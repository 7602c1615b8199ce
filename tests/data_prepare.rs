//! `lean-grpo prepare`: one fixture per public format (records in the dataset's published field
//! layout, see tests/data/prepare/SOURCES.md), each with a malformed fourth record and the error
//! it gets; our own JSONL round-trips; Parquet input reads the same records as JSONL.

use std::path::{Path, PathBuf};
use std::process::Command;

use lean_grpo::data::load_theorems;
use lean_grpo::data::prepare::{prepare, Format, PrepareOptions};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/data/prepare").join(name)
}

/// Each fixture: 3 good records and the reason the fourth (line 4) is refused.
const CASES: [(&str, Format, &str); 9] = [
    (
        "yangky11_minif2f",
        Format::Minif2fLean4,
        "does not end with `:=`",
    ),
    (
        "deepseek_minif2f",
        Format::DeepseekMinif2f,
        "missing field `formal_statement`",
    ),
    (
        "lean_workbook",
        Format::LeanWorkbook,
        "does not end with `:=`",
    ),
    (
        "goedel_pset",
        Format::GoedelPset,
        "no `theorem` or `lemma` declaration",
    ),
    ("numina_lean", Format::Numina, "does not end with `:=`"),
    (
        "kimina_promptset",
        Format::Numina,
        "missing field `uuid` or `statement_id` or `name`",
    ),
    (
        "aimo_minif2f_test",
        Format::Numina,
        "no `theorem` or `lemma` declaration",
    ),
    (
        "fineleancorpus",
        Format::Fineleancorpus,
        "2 declarations in one record",
    ),
    (
        "lean_workbook_wkbk1009",
        Format::LeanWorkbook,
        "missing field `formal_statement`",
    ),
];

#[test]
fn every_format_converts_its_good_records_and_names_the_bad_one() {
    for (name, format, reason) in CASES {
        let input = fixture(&format!("{name}.jsonl"));
        let (theorems, report) = prepare(&input, format, &PrepareOptions::default()).unwrap();
        assert_eq!(report.read, 4, "{name}");
        let bad: Vec<_> = report.skipped.iter().map(|s| (&s.at, &s.reason)).collect();
        assert_eq!(bad.len(), 1, "{name}: {bad:?}");
        assert!(
            bad[0].0.ends_with(&format!("{name}.jsonl:4")),
            "{name}: {bad:?}"
        );
        assert!(bad[0].1.contains(reason), "{name}: {bad:?}");
        for t in &theorems {
            assert!(
                t.statement.trim_start().starts_with("theorem") || t.statement.starts_with("/--")
            );
            assert!(t.statement.ends_with(":="), "{name}: {}", t.statement);
            assert!(
                !t.statement.contains("import "),
                "{name}: imports stay in the header"
            );
            let proof = t.proof.as_deref().unwrap_or("by");
            assert!(
                !proof.contains("sorry"),
                "{name}: a placeholder kept as a proof"
            );
        }
        // The per-tactic layout lists one statement per step: the repeats are duplicates.
        let expected = if name == "lean_workbook_wkbk1009" {
            2
        } else {
            3
        };
        assert_eq!(theorems.len() + report.duplicates.len(), 3, "{name}");
        assert_eq!(theorems.len(), expected, "{name}");
    }
}

#[test]
fn known_proofs_and_headers_are_kept_where_the_format_has_them() {
    let (minif2f, _) = prepare(
        &fixture("yangky11_minif2f.jsonl"),
        Format::Minif2fLean4,
        &PrepareOptions::default(),
    )
    .unwrap();
    assert!(minif2f.iter().any(|t| t.proof.is_some()));
    assert!(minif2f.iter().all(|t| t
        .header
        .as_deref()
        .is_some_and(|h| h.contains("import Mathlib"))));
    assert!(minif2f.iter().all(|t| t.split.is_some()));
    let (numina, _) = prepare(
        &fixture("numina_lean.jsonl"),
        Format::Numina,
        &PrepareOptions::default(),
    )
    .unwrap();
    let with_truth = numina
        .iter()
        .find(|t| t.proof.is_some())
        .expect("a complete ground truth");
    assert!(with_truth.proof.as_deref().unwrap().starts_with("by"));
    assert_eq!(with_truth.header.as_deref(), Some("import Mathlib\n\n"));
}

#[test]
fn our_own_jsonl_round_trips_record_for_record() {
    let input = Path::new(ROOT).join("data/prelude.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("prelude.jsonl");
    let status = Command::new(env!("CARGO_BIN_EXE_lean-grpo"))
        .args([
            "prepare",
            input.to_str().unwrap(),
            "--format",
            "lean-grpo",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        load_theorems(&out, None).unwrap(),
        load_theorems(&input, None).unwrap()
    );
}

#[test]
fn split_ratio_and_limit_are_seeded_and_refused_out_of_range() {
    let input = Path::new(ROOT).join("data/prelude.jsonl");
    let options = |ratio, limit, seed| PrepareOptions {
        split_ratio: Some(ratio),
        seed,
        limit,
    };
    let (all, _) = prepare(&input, Format::LeanGrpo, &options(0.25, None, 1)).unwrap();
    let tests = all
        .iter()
        .filter(|t| t.split.as_deref() == Some("test"))
        .count();
    assert!((8..=30).contains(&tests), "about a quarter of 75: {tests}");
    let (again, _) = prepare(&input, Format::LeanGrpo, &options(0.25, None, 1)).unwrap();
    assert_eq!(all, again, "the same seed, the same splits");
    let (limited, _) = prepare(&input, Format::LeanGrpo, &options(0.25, Some(10), 1)).unwrap();
    assert_eq!(limited.len(), 10);
    let err = prepare(&input, Format::LeanGrpo, &options(1.5, None, 1)).unwrap_err();
    assert!(err.to_string().contains("--split-ratio 1.5"), "{err}");
}

#[test]
fn parquet_input_reads_the_same_records_as_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let parquet = dir.path().join("numina.parquet");
    write_parquet(&fixture("numina_lean.jsonl"), &parquet);
    let options = PrepareOptions::default();
    let (from_parquet, report) = prepare(&parquet, Format::Numina, &options).unwrap();
    let (from_jsonl, _) = prepare(&fixture("numina_lean.jsonl"), Format::Numina, &options).unwrap();
    assert_eq!(from_parquet, from_jsonl);
    assert!(
        report.skipped[0].at.ends_with("numina.parquet row 4"),
        "{:?}",
        report.skipped
    );
}

/// Writes the string fields of a JSONL fixture as a Snappy-compressed Parquet file, the way
/// Hugging Face datasets ship them (every column an optional UTF-8 string).
fn write_parquet(jsonl: &Path, out: &Path) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let rows: Vec<serde_json::Map<String, serde_json::Value>> = std::fs::read_to_string(jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let columns = [
        "uuid",
        "formal_statement",
        "formal_ground_truth",
        "ground_truth_type",
    ];
    let schema = format!(
        "message record {{ {} }}",
        columns
            .map(|c| format!("optional binary {c} (UTF8);"))
            .join(" ")
    );
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(out).unwrap();
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for column in columns {
        let mut values = Vec::new();
        let mut levels = Vec::new();
        for row in &rows {
            match row.get(column).and_then(|v| v.as_str()) {
                Some(s) => {
                    values.push(ByteArray::from(s));
                    levels.push(1);
                }
                None => levels.push(0),
            }
        }
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&levels), None)
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}
