//! Configuration precedence (defaults < file < flags), error messages, and the shipped configs.

use std::path::Path;

use lean_grpo::config::{Config, Override};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn defaults_then_file_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.yaml",
        "train:\n  learning_rate: 3.0e-5\n  num_generations: 4\nchecker:\n  timeout: 12\n",
    );
    let flags = [Override::new("train", "num_generations", 16)];
    let config = Config::load(Some(&file), &flags, None).unwrap();
    assert_eq!(config.train.learning_rate, 3e-5, "file beats default");
    assert_eq!(config.train.num_generations, 16, "flag beats file");
    assert_eq!(config.checker.timeout, 12.0);
    assert_eq!(
        config.train.batch_size, 4,
        "untouched keys keep their defaults"
    );
    let defaults = Config::load(None, &[], None).unwrap();
    assert_eq!(defaults, Config::default());
}

#[test]
fn json_files_and_algo_config_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.json",
        r#"{"train": {"algorithm": "dapo"}, "algorithm_config": {"beta": 0.01, "epsilon": 0.1}}"#,
    );
    let config = Config::load(Some(&file), &[], Some(r#"{"beta": 0.04}"#)).unwrap();
    assert_eq!(config.train.algorithm, "dapo");
    assert_eq!(
        config.algorithm_config["beta"], 0.04,
        "--algo-config beats the file"
    );
    assert_eq!(config.algorithm_config["epsilon"], 0.1);
}

#[test]
fn unknown_key_lists_the_valid_keys_of_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.yaml", "train:\n  lerning_rate: 1.0e-5\n");
    let err = Config::load(Some(&file), &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}: `train.lerning_rate`: unknown field `lerning_rate`, expected one of `algorithm`, `num_generations`, `batch_size`", file.display())), "{err}");
    assert!(err.contains("`learning_rate`"), "{err}");
}

#[test]
fn unknown_section_lists_the_sections() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.yaml", "trainer:\n  seed: 1\n");
    let err = Config::load(Some(&file), &[], None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: unknown section `trainer`; valid sections: model, lora, sampling, train, algorithm_config, checker, eval",
            file.display()
        )
    );
}

#[test]
fn wrong_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.yaml", "checker:\n  jobs: many\n");
    let err = Config::load(Some(&file), &[], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`checker.jobs`: invalid type: string \"many\""),
        "{err}"
    );
}

#[test]
fn bad_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let toml = write(dir.path(), "c.toml", "x = 1");
    let err = Config::load(Some(&toml), &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("unknown config format; name the file *.yaml, *.yml or *.json"));
    let list = write(dir.path(), "c.yaml", "- 1\n- 2\n");
    let err = Config::load(Some(&list), &[], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("expected a mapping of sections, found a list"),
        "{err}"
    );
    let broken = write(dir.path(), "c.json", "{\"train\": ");
    let err = Config::load(Some(&broken), &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid JSON"), "{err}");
    let err = Config::load(None, &[], Some("[1]"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--algo-config: expected a JSON object"),
        "{err}"
    );
}

#[test]
fn printed_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        Override::new("train", "algorithm", "gspo"),
        Override::new("train", "split", "train"),
        Override::new("checker", "lean_cmd", "lean --json"),
        Override::new("eval", "k", vec![1, 4]),
    ];
    let config = Config::load(None, &flags, Some(r#"{"num_minibatches": 2}"#)).unwrap();
    let printed = write(dir.path(), "printed.yaml", &config.to_yaml());
    let reloaded = Config::load(Some(&printed), &[], None).unwrap();
    assert_eq!(reloaded, config);
}

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = Config::load(Some(&path), &[], None)
            .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        assert!(!config.model.model.is_empty());
        count += 1;
    }
    assert!(
        count >= 6,
        "expected a config per algorithm and an eval config, found {count}"
    );
}
