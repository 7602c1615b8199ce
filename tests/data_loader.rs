//! The theorem loader: every bad input is an error naming file, line and field, never a panic.

use std::io::Write;
use std::path::PathBuf;

use lean_grpo::data::{load_theorems, user_message};

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn file_with(bytes: &[u8]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("theorems.jsonl");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    Fixture { _dir: dir, path }
}

fn error_of(bytes: &[u8]) -> String {
    let f = file_with(bytes);
    let err = load_theorems(&f.path, None).expect_err("the loader accepted bad input");
    // Messages are relative to the file the user named; strip the temp directory.
    err.to_string()
        .replace(&format!("{}", f.path.display()), "theorems.jsonl")
}

const GOOD: &str = r#"{"name": "t1", "statement": "theorem t1 : True :=", "proof": "trivial"}"#;

#[test]
fn missing_field_names_file_line_and_field() {
    let input = format!("{GOOD}\n{{\"name\": \"t2\"}}\n");
    assert_eq!(
        error_of(input.as_bytes()),
        "theorems.jsonl:2: missing field \"statement\""
    );
}

#[test]
fn wrong_field_type_is_named() {
    let input = r#"{"name": 7, "statement": "theorem x : True :="}"#;
    assert_eq!(
        error_of(input.as_bytes()),
        "theorems.jsonl:1: field \"name\" must be a string, found a number"
    );
    let input = r#"{"name": "x", "statement": "theorem x : True :=", "imports": "Mathlib"}"#;
    assert_eq!(
        error_of(input.as_bytes()),
        "theorems.jsonl:1: field \"imports\" must be an array of module names, found a string"
    );
}

#[test]
fn duplicate_names_are_an_error_naming_both_lines() {
    let input = format!("{GOOD}\n\n{GOOD}\n");
    assert_eq!(
        error_of(input.as_bytes()),
        "theorems.jsonl:3: duplicate theorem name \"t1\" (first defined on line 1); names must be unique"
    );
}

#[test]
fn empty_file_is_an_error() {
    let expected =
        "theorems.jsonl: no theorem records (the file is empty); expected one JSON object per line";
    assert_eq!(error_of(b""), expected);
    assert_eq!(error_of(b"\n  \n\r\n"), expected);
}

#[test]
fn invalid_utf8_is_an_error() {
    let mut input = GOOD.as_bytes().to_vec();
    input.extend_from_slice(b"\n{\"name\": \"bad\xff\", \"statement\": \"x\"}\n");
    assert_eq!(
        error_of(&input),
        "theorems.jsonl:2: invalid UTF-8 at byte 14 of the line; theorem files must be UTF-8"
    );
}

#[test]
fn non_objects_are_errors() {
    assert_eq!(
        error_of(b"42\n"),
        "theorems.jsonl:1: expected a JSON object (one theorem record per line), found a number"
    );
    assert_eq!(
        error_of(b"[1, 2]\n"),
        "theorems.jsonl:1: expected a JSON object (one theorem record per line), found an array"
    );
    assert_eq!(
        error_of(b"\"theorem\"\n"),
        "theorems.jsonl:1: expected a JSON object (one theorem record per line), found a string"
    );
}

#[test]
fn truncated_json_is_an_error() {
    let err = error_of(br#"{"name": "t1", "statement": "theorem t1 : Tr"#);
    assert!(
        err.starts_with("theorems.jsonl:1: invalid JSON: EOF while parsing a string"),
        "{err}"
    );
}

#[test]
fn ten_megabytes_on_one_line_does_not_panic() {
    let mut input = b"{\"name\": \"big\", \"statement\": \"".to_vec();
    input.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    // Unterminated: the string never closes.
    let err = error_of(&input);
    assert!(
        err.starts_with("theorems.jsonl:1: invalid JSON"),
        "{}",
        &err[..80]
    );
    // And a well-formed 10 MB record loads.
    input.extend_from_slice(b"\"}\n");
    let f = file_with(&input);
    let theorems = load_theorems(&f.path, None).unwrap();
    assert_eq!(theorems[0].statement.len(), 10 * 1024 * 1024 + 3);
}

#[test]
fn crlf_and_bom_are_accepted() {
    let input = format!("\u{feff}{GOOD}\r\n{}\r\n", GOOD.replace("t1", "t2"));
    let f = file_with(input.as_bytes());
    let theorems = load_theorems(&f.path, None).unwrap();
    assert_eq!(theorems.len(), 2);
    assert_eq!(theorems[0].name, "t1");
    assert_eq!(theorems[1].proof.as_deref(), Some("trivial"));
}

#[test]
fn statement_without_assign_gets_one() {
    // The seed project's shape: no trailing `:=`.
    let input = r#"{"name": "add_zero", "statement": "theorem add_zero (n : Nat) : n + 0 = n"}"#;
    let f = file_with(input.as_bytes());
    let theorems = load_theorems(&f.path, None).unwrap();
    assert_eq!(
        theorems[0].statement,
        "theorem add_zero (n : Nat) : n + 0 = n :="
    );
    // With `:=` (and trailing spaces) it is kept as is.
    let input = r#"{"name": "a", "statement": "theorem a : True :=  ", "extra": {"kept": 1}}"#;
    let f = file_with(input.as_bytes());
    assert_eq!(
        load_theorems(&f.path, None).unwrap()[0].statement,
        "theorem a : True :="
    );
}

#[test]
fn split_filters_and_unknown_split_lists_the_present_ones() {
    let input = "{\"name\": \"a\", \"statement\": \"s :=\", \"split\": \"train\"}\n\
                 {\"name\": \"b\", \"statement\": \"s :=\", \"split\": \"test\"}\n";
    let f = file_with(input.as_bytes());
    let test = load_theorems(&f.path, Some("test")).unwrap();
    assert_eq!(test.len(), 1);
    assert_eq!(test[0].name, "b");
    let err = load_theorems(&f.path, Some("valid"))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("no record has split \"valid\"; splits in this file: \"train\", \"test\""),
        "{err}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = load_theorems(std::path::Path::new("no/such/theorems.jsonl"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no/such/theorems.jsonl: cannot read:"),
        "{err}"
    );
}

#[test]
fn shipped_data_sets_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let minif2f = load_theorems(&root.join("minif2f.jsonl"), None).unwrap();
    assert_eq!(minif2f.len(), 488);
    assert_eq!(
        load_theorems(&root.join("minif2f.jsonl"), Some("test"))
            .unwrap()
            .len(),
        244
    );
    assert!(minif2f[0]
        .header
        .as_deref()
        .unwrap()
        .starts_with("import Mathlib\n"));
    let toy = load_theorems(&root.join("toy.jsonl"), None).unwrap();
    assert_eq!(toy.len(), 59);
    let prelude = load_theorems(&root.join("prelude.jsonl"), None).unwrap();
    assert_eq!(prelude.len(), 75);
    assert_eq!(
        load_theorems(&root.join("prelude.jsonl"), Some("train"))
            .unwrap()
            .len(),
        59
    );
    assert!(prelude
        .iter()
        .all(|t| t.statement.ends_with(":=") && t.proof.is_some()));
}

#[test]
fn prompt_shows_preamble_and_statement_verbatim() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let toy = load_theorems(&root.join("toy.jsonl"), None).unwrap();
    let with_context = toy
        .iter()
        .find(|t| t.context.as_deref().is_some_and(|c| !c.is_empty()));
    let theorem = with_context.expect("toy.jsonl has records with a context");
    let msg = user_message(theorem);
    let expected_code = format!(
        "```lean\n{}\n\n{}\n```",
        theorem.context.as_deref().unwrap(),
        theorem.statement
    );
    assert!(msg.ends_with(&expected_code), "{msg}");
}
