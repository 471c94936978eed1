use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use edgegen::commands;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("EDGEGEN_LOG", "info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<FieldError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
