//! One function per subcommand: the glue between the CLI and the pipeline modules.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::cli::{
    AlgorithmsArgs, CheckArgs, Cli, Command, ConfigArgs, EvalArgs, ExportArgs, PlotArgs, TrainArgs,
};
use crate::config::{Config, Override};
use crate::data::load_theorems;
use crate::train::{RunDir, TheoremFile, TrainInputs};

/// What a command that ran to the end found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Success,
    /// The job ran and found failures (e.g. rejected proofs): exit code 1.
    Failures,
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::Failures => ExitCode::from(1),
        }
    }
}

/// Errors caused by what the user gave us (bad file, bad flag, bad config): exit code 2.
pub fn is_input_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<crate::data::LoadError>() || cause.is::<crate::config::ConfigError>()
    })
}

pub fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Train(args) => train(args, cli.quiet),
        Command::Eval(args) => eval(args, cli.quiet),
        Command::Filter(args) => filter(args),
        Command::Prepare(args) => prepare(args),
        Command::Check(args) => check(args, cli.quiet),
        Command::Algorithms(args) => algorithms(args),
        Command::Export(args) => export(args),
        Command::Plot(args) => plot(args),
        Command::Sft(args) => sft(args, cli.quiet),
        Command::InitModel(args) => init_model(args),
        Command::Bench(args) => bench(args),
    }
}

/// Loads the effective configuration; `None` when `--print-config` asked only for it.
fn configure(
    args: &ConfigArgs,
    flags: &[Override],
    algo_config: Option<&str>,
) -> Result<Option<Config>> {
    configure_onto(&Config::default(), args, flags, algo_config)
}

/// [`configure`] over `base` instead of the defaults (a resumed run's own configuration).
fn configure_onto(
    base: &Config,
    args: &ConfigArgs,
    flags: &[Override],
    algo_config: Option<&str>,
) -> Result<Option<Config>> {
    let config = Config::load_onto(base, args.config.as_deref(), flags, algo_config)?;
    if args.print_config {
        print!("{}", config.with_resolved_algorithm()?.to_yaml());
        return Ok(None);
    }
    Ok(Some(config))
}

fn train(args: TrainArgs, quiet: bool) -> Result<Outcome> {
    // A resumed run continues with its own configuration and theorem file; what is given on
    // the command line goes over them (and must agree, but for what a resume may change).
    let (base, started_on) = match &args.resume {
        Some(run) => (RunDir::saved_config(run)?, RunDir::saved_theorems(run)?),
        None => (Config::default(), None),
    };
    let flags = args.overrides();
    let algo_config = args.algo_config.as_deref();
    let Some(config) = configure_onto(&base, &args.config, &flags, algo_config)? else {
        return Ok(Outcome::Success);
    };
    let theorem_path = match (&args.theorems, started_on) {
        (Some(path), _) => path.clone(),
        (None, Some(file)) => file.path,
        (None, None) => match &args.resume {
            Some(run) => bail!(
                "{} does not record its theorem file (it predates `theorems.json`); give it: \
                 lean-grpo train THEOREMS.jsonl --resume {}",
                run.display(),
                run.display()
            ),
            None => bail!("give the theorem file to train on: lean-grpo train THEOREMS.jsonl"),
        },
    };
    let theorem_file = TheoremFile::read(&theorem_path)?;
    let theorems = load_theorems(&theorem_path, config.train.split.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // The first Ctrl-C asks the loop to checkpoint and stop; a second one exits at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint (Ctrl-C again to quit without one)");
    });
    let report = crate::train::train(
        &config,
        TrainInputs {
            theorems,
            theorem_file,
            resume: args.resume.as_deref(),
            show_progress: !quiet && std::io::stderr().is_terminal(),
            stop,
        },
    )?;
    let status = if report.interrupted {
        "stopped"
    } else {
        "finished"
    };
    println!(
        "{status} after step {} — run directory {}",
        report.steps,
        report.run_dir.display()
    );
    if let Some(m) = &report.last {
        println!(
            "last step: reward {:.3}, pass rate {:.1}%",
            m.reward_mean,
            100.0 * m.pass_rate
        );
    }
    if report.interrupted {
        println!(
            "continue with: lean-grpo train --resume {}",
            report.run_dir.display()
        );
    }
    Ok(Outcome::Success)
}

fn filter(args: crate::cli::FilterArgs) -> Result<Outcome> {
    use crate::data::filter::{filter_by_pass_rate, Band};
    let theorems = load_theorems(&args.theorems, args.split.as_deref())?;
    let band = Band {
        min: args.min_pass_rate,
        max: args.max_pass_rate,
    };
    let (kept, report) = filter_by_pass_rate(&theorems, &args.theorems, &args.from, band)?;
    crate::data::write_theorems(&args.output, &kept)?;
    let mut beside = args.output.clone().into_os_string();
    beside.push(".filter.json");
    let beside = std::path::PathBuf::from(beside);
    crate::atomic::write_file(&beside, &serde_json::to_vec_pretty(&report)?)?;
    print!("{}", report.render());
    println!(
        "written: {} ({} records) and {}",
        args.output.display(),
        kept.len(),
        beside.display()
    );
    Ok(Outcome::Success)
}

fn prepare(args: crate::cli::PrepareArgs) -> Result<Outcome> {
    use crate::data::prepare::{prepare, PrepareOptions};
    let options = PrepareOptions {
        split_ratio: args.split_ratio,
        seed: args.seed,
        limit: args.limit,
    };
    let (theorems, report) = prepare(&args.input, args.format, &options)?;
    if theorems.is_empty() {
        print!("{}", report.render());
        let format = clap::ValueEnum::to_possible_value(&args.format)
            .map_or_else(String::new, |v| v.get_name().to_string());
        bail!(
            "{}: no record could be converted as --format {format}; nothing written",
            args.input.display()
        );
    }
    crate::data::write_theorems(&args.output, &theorems)?;
    print!("{}", report.render());
    println!("written: {}", args.output.display());
    Ok(Outcome::Success)
}

fn eval(args: EvalArgs, quiet: bool) -> Result<Outcome> {
    let Some(config) = configure(&args.config, &args.overrides(), None)? else {
        return Ok(Outcome::Success);
    };
    let theorems = load_theorems(&args.theorems, config.eval.split.as_deref())?;
    let show = !quiet && std::io::stderr().is_terminal();
    let report = crate::eval::evaluate(&config, &theorems, show)?;
    print!("{}", crate::passk::render_table(&report.summary));
    println!("results: {}", report.output_dir.display());
    Ok(Outcome::Success)
}

fn check(args: CheckArgs, quiet: bool) -> Result<Outcome> {
    if args.explain_screening {
        print!("{}", crate::lean::explain_screening());
        return Ok(Outcome::Success);
    }
    let Some(config) = configure(&args.config, &args.overrides(), None)? else {
        return Ok(Outcome::Success);
    };
    let Some(path) = &args.theorems else {
        anyhow::bail!("give a theorem file to check (or --explain-screening)");
    };
    let theorems = load_theorems(path, args.split.as_deref())?;
    let show = !quiet && std::io::stderr().is_terminal();
    let summary = crate::lean::run_check(
        &theorems,
        args.completions.as_deref(),
        args.output.as_deref(),
        &config.checker,
        show,
    )?;
    println!("{summary}");
    Ok(if summary.rejected > 0 {
        Outcome::Failures
    } else {
        Outcome::Success
    })
}

fn algorithms(args: AlgorithmsArgs) -> Result<Outcome> {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::algo::catalog_json())?
        );
    } else {
        print!("{}", crate::algo::table());
    }
    Ok(Outcome::Success)
}

fn export(args: ExportArgs) -> Result<Outcome> {
    let base = if std::path::Path::new(&args.model).is_dir() {
        std::path::PathBuf::from(&args.model)
    } else {
        let hub = crate::model::load::HubSettings::from_env();
        crate::model::load::resolve_hub(&args.model, "main", &hub)?
    };
    crate::model::adapter::export_merged(&base, &args.adapter, &args.output)?;
    println!("merged model written to {}", args.output.display());
    Ok(Outcome::Success)
}

fn plot(args: PlotArgs) -> Result<Outcome> {
    let out = args
        .output
        .unwrap_or_else(|| args.run_dir.join("reward.png"));
    crate::plot::plot_run(&args.run_dir, &out)?;
    println!("{}", out.display());
    Ok(Outcome::Success)
}

// ---- learning experiments: `sft` and `init-model` ----

fn sft(args: crate::cli::SftArgs, quiet: bool) -> Result<Outcome> {
    let Some(config) = configure(&args.config, &args.overrides(), None)? else {
        return Ok(Outcome::Success);
    };
    let theorems = load_theorems(&args.theorems, args.split.as_deref())?;
    let options = crate::sft::SftOptions {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        limit: args.limit,
        seed: args.seed,
    };
    let show = !quiet && std::io::stderr().is_terminal();
    let report = crate::sft::run_sft(&config, &theorems, &options, &args.output, show)?;
    println!(
        "{} examples, {} steps: token NLL {:.3} -> {:.3}; adapter written to {}",
        report.examples,
        report.steps,
        report.nll_before,
        report.nll_after,
        report.adapter_dir.display()
    );
    Ok(Outcome::Success)
}

fn init_model(args: crate::cli::InitModelArgs) -> Result<Outcome> {
    let theorems = load_theorems(&args.corpus, None)?;
    let texts = crate::sft::theorem_corpus(&theorems);
    let options = crate::model::init::InitOptions {
        hidden_size: args.hidden,
        num_hidden_layers: args.layers,
        num_attention_heads: args.heads,
        num_key_value_heads: args.kv_heads,
        intermediate_size: args.intermediate.unwrap_or(2 * args.hidden),
        vocab_size: args.vocab,
        max_position_embeddings: args.max_position_embeddings,
        seed: args.seed,
    };
    let summary = crate::model::init::init_model(&texts, &options, &args.output)?;
    println!(
        "random qwen2 model ({} parameters, vocabulary {}) written to {}",
        summary.parameters,
        summary.vocab_size,
        args.output.display()
    );
    Ok(Outcome::Success)
}

fn bench(args: crate::cli::BenchArgs) -> Result<Outcome> {
    use crate::bench::{Mode, Plan};
    let mode = if args.reduced {
        Mode::Reduced
    } else {
        Mode::Full
    };
    let summary = crate::bench::run(
        &Plan::new(mode, args.large),
        args.lean_cmd.as_deref(),
        &args.theorems,
    )?;
    let json = serde_json::to_string_pretty(&summary)?;
    // Printed first: minutes of measurement are not lost to an unwritable --output.
    println!("{json}");
    if let Some(path) = &args.output {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Outcome::Success)
}
