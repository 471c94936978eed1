use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use edgegen::commands;
use edgegen::mqtt::requester::{self, Refused, RequestOptions};
use edgegen::request::{FieldError, Request};

#[derive(Parser)]
#[command(
    name = "edgegen",
    version,
    about = "Offline text-to-image on small devices"
)]
struct Cli {
    /// Configuration file (default: config/edgegen.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate pictures from a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Time each component of a generation (median of several runs after a warm-up).
    Bench(BenchArgs),
    /// Run the daemon: take requests over MQTT, generate, store and answer.
    Serve,
    /// Send one request to a running daemon, show its progress, save the picture.
    Request(RequestArgs),
    /// Show the CPU features detected and the kernels tract selects on this machine.
    Doctor {
        /// Model to run once (one step, nothing written); default: models.default.
        #[arg(long)]
        model: Option<String>,
        /// Only report the CPU and kernel preferences; run no model.
        #[arg(long)]
        skip_model: bool,
    },
    /// List or inspect installed model bundles.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// One line per bundle in the models directory.
    List,
    /// Components, inputs, weight formats and defaults of one bundle.
    Inspect { id: String },
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, conflicts_with = "onnx")]
    model: Option<String>,
    /// Bench one ONNX file instead of a bundle (inputs from --input).
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// With --onnx: NAME=SHAPE[:DTYPE[:RANGE]] for each graph input, e.g.
    /// sample=1x4x64x64, timestep=scalar, input_ids=1x77:i32:49408.
    #[arg(long = "input", requires = "onnx")]
    inputs: Vec<String>,
    /// With --onnx: write each output as raw little-endian f32 into DIR.
    #[arg(long, value_name = "DIR", requires = "onnx")]
    save_outputs: Option<PathBuf>,
    /// With --onnx: use this compile cache directory (a second run shows the
    /// warm start). Bundles use engine.cache_dir.
    #[arg(long, value_name = "DIR", requires = "onnx")]
    cache_dir: Option<PathBuf>,
    /// Threads for tract's kernels (default: engine.threads).
    #[arg(long)]
    threads: Option<usize>,
    /// resident or sequential (default: engine.memory).
    #[arg(long, conflicts_with = "onnx")]
    memory: Option<String>,
    /// Largest attention score tensor computed whole, in MiB; 0: all whole
    /// (default: engine.attention_slice_mb).
    #[arg(long, value_name = "MIB")]
    attention_slice_mb: Option<usize>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    /// Timed runs after the warm-up.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RequestArgs {
    #[command(flatten)]
    generate: GenerateArgs,
    /// Job id (letters, digits, '_' and '-'; at most 64); default: a new one.
    #[arg(long)]
    id: Option<String>,
    /// Broker URL, e.g. mqtt://host:1883 (default: the configured broker).
    #[arg(long)]
    broker: Option<String>,
    /// Node id of the daemon (default: mqtt.node_id, else this host's name).
    #[arg(long, conflicts_with = "fleet")]
    node: Option<String>,
    /// Send to the fleet topic `<prefix>/request`: whichever daemon of the
    /// shared group takes the job answers.
    #[arg(long)]
    fleet: bool,
    /// Seconds to wait for the result.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

impl RequestArgs {
    fn into_options(self) -> RequestOptions {
        let output = self.generate.output.clone();
        let mut request = self.generate.into_request();
        request.id = self.id;
        RequestOptions {
            request,
            broker: self.broker,
            node: self.node,
            fleet: self.fleet,
            output,
            timeout: std::time::Duration::from_secs(self.timeout),
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Model id (a directory under models.dir) or a path to a bundle.
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    /// euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras or lcm.
    #[arg(long)]
    scheduler: Option<String>,
    /// Class name, for class-conditional GAN models.
    #[arg(long)]
    class: Option<String>,
    /// Number of pictures.
    #[arg(long)]
    batch: Option<u32>,
    /// Output PNG (default: <output_dir>/<date>/<id>.png).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

impl GenerateArgs {
    fn into_request(self) -> Request {
        Request {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            model: self.model,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            width: self.width,
            height: self.height,
            scheduler: self.scheduler,
            class: self.class,
            batch: self.batch,
            ..Request::default()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = commands::load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Generate(args) => {
            let output = args.output.clone();
            let outcome = commands::generate(&config, &args.into_request(), output.as_deref())?;
            for image in &outcome.images {
                log::info!("seed {}: {}", image.seed, image.path.display());
                println!("{}", image.path.display());
            }
        }
        Command::Serve => edgegen::daemon::serve(config)?,
        Command::Request(args) => {
            let answer = requester::run(&config, args.into_options())?;
            log::info!("job {} done by node '{}'", answer.result.id, answer.node);
            match (&answer.saved, &answer.result.path) {
                (Some(saved), _) => println!("{}", saved.display()),
                (None, Some(stored)) => println!("{stored}"),
                (None, None) => {}
            }
        }
        Command::Doctor { model, skip_model } => {
            let options = edgegen::doctor::DoctorOptions {
                model: model.as_deref(),
                skip_model,
            };
            print!("{}", edgegen::doctor::report(&config, &options)?)
        }
        Command::Bench(args) => bench(config, args)?,
        Command::Models {
            command: ModelsCommand::List,
        } => print!("{}", commands::models_list(&config)?),
        Command::Models {
            command: ModelsCommand::Inspect { id },
        } => {
            print!("{}", commands::models_inspect(&config, &id)?)
        }
    }
    Ok(())
}

fn bench(mut config: edgegen::config::Config, args: BenchArgs) -> anyhow::Result<()> {
    use edgegen::bench;
    if let Some(threads) = args.threads {
        config.engine.threads = threads;
    }
    if let Some(mb) = args.attention_slice_mb {
        config.engine.attention_slice_mb = mb;
    }
    if let Some(path) = args.onnx {
        let spec = bench::OnnxBenchSpec {
            path,
            inputs: args
                .inputs
                .iter()
                .map(|s| s.parse())
                .collect::<anyhow::Result<_>>()?,
            threads: config.engine.threads,
            runs: args.runs,
            save_outputs: args.save_outputs,
            cache_dir: args.cache_dir,
            attention_slice_bytes: config.attention_slice_bytes(),
            matrix_path: config.matrix_path(),
        };
        let report = bench::run_onnx(&spec)?;
        let text = if args.json {
            report.to_json()? + "\n"
        } else {
            report.table()
        };
        print!("{text}");
        return Ok(());
    }
    if let Some(memory) = &args.memory {
        config.engine.memory = bench::parse_memory_mode(memory)?;
    }
    let spec = bench::BenchSpec {
        request: Request {
            prompt: Some("a red apple on a tree".into()),
            model: args.model,
            width: args.width,
            height: args.height,
            steps: args.steps,
            ..Request::default()
        },
        runs: args.runs,
    };
    let report = bench::run(&config, &spec)?;
    let text = if args.json {
        report.to_json()? + "\n"
    } else {
        report.table()
    };
    print!("{text}");
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("EDGEGEN_LOG", "info,rumqttd=off"),
    )
    .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let refused = err
                .downcast_ref::<Refused>()
                .is_some_and(Refused::is_usage_error);
            if err.downcast_ref::<FieldError>().is_some() || refused {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
