//! The `podfs` command line: parses arguments and dispatches to [`podfs::commands`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use podfs::commands::{self, Context, LoadArgs, SaveArgs};
use podfs::config::DEFAULT_REMOTE;
use podfs::pod::PodRef;
use podfs::pod::load::Strategy;

/// Versioned snapshots of directory trees ("pods") on S3, OCI registries and local directories.
///
/// The volume dir (remotes.toml, the default remote's pods) is $PODFS_HOME, else
/// $XDG_DATA_HOME/podfs, else ~/.local/share/podfs. Set PODFS_LOG=debug for detailed logs.
#[derive(Parser)]
#[command(name = "podfs", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage remotes: where pods are stored.
    Remote {
        #[command(subcommand)]
        command: RemoteCommand,
    },
    #[command(flatten)]
    Pod(PodCommand),
}

/// The commands that work on pods (they need the async runtime).
#[derive(Subcommand)]
enum PodCommand {
    /// Save a directory as the next version of a pod.
    Save {
        /// Pod name: letters, digits, '-' and '_'.
        pod: String,
        /// Remote to save to.
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        /// Directory to save (default: the current directory).
        #[arg(long)]
        from: Option<PathBuf>,
        /// A message kept with the version.
        #[arg(short, long, default_value = "")]
        message: String,
        #[arg(long)]
        json: bool,
    },
    /// Load a version of a pod (default: the latest) into a directory.
    Load {
        /// POD or POD:VERSION.
        pod: String,
        /// Remote to load from.
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        /// Directory to load into (default: the current directory).
        #[arg(long)]
        into: Option<PathBuf>,
        /// merge: write the pod's entries and keep other files; overwrite: make the directory
        /// exactly the version.
        #[arg(long, value_enum, default_value_t = Strategy::Merge)]
        strategy: Strategy,
        /// Only list what would be added (+), changed (~) and removed (-).
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the pods on a remote.
    List {
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// List the versions of a pod.
    Versions {
        pod: String,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the tree of a version (default: the latest).
    Inspect {
        /// POD or POD:VERSION.
        pod: String,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete one version (POD:VERSION) or a whole pod (POD).
    Delete {
        /// POD or POD:VERSION.
        pod: String,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
    },
}

#[derive(Subcommand)]
enum RemoteCommand {
    /// Add a remote: s3://BUCKET[/PREFIX]/?..., oras://[USER:PASS@]HOST/NAMESPACE, file:///PATH.
    /// {placeholders} are filled from environment variables when the remote is used.
    Add { name: String, url: String },
    /// Delete a remote (the pods stored there are not touched).
    Delete { name: String },
    /// List the available remotes (literal credentials masked).
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Large transfer buffers (up to 8 MiB) are allocated and freed by many threads; glibc would
/// keep them in per-thread arenas and grow the RSS far past what is in use. Serving every
/// allocation of 1 MiB or more with mmap returns it to the system on free.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; called once before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODFS_LOG")
                // aws-config logs each failed credential provider with a debug dump at `warn`;
                // the S3 backend reports the outcome itself, in one line.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,aws_config=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut ctx = Context::from_env()?;
    let command = match cli.command {
        Command::Remote { command } => {
            return match command {
                RemoteCommand::Add { name, url } => commands::remote_add(&mut ctx, &name, &url),
                RemoteCommand::Delete { name } => commands::remote_delete(&mut ctx, &name),
                RemoteCommand::List { json } => commands::remote_list(&ctx, json),
            };
        }
        Command::Pod(command) => command,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            PodCommand::Save {
                pod,
                remote,
                from,
                message,
                json,
            } => {
                let from = commands::dir_or_cwd(from)?;
                commands::check_not_volume(&ctx, &from)?;
                let args = SaveArgs {
                    pod,
                    remote,
                    from,
                    message,
                    json,
                };
                commands::save(&ctx, args).await
            }
            PodCommand::Load {
                pod,
                remote,
                into,
                strategy,
                dry_run,
                json,
            } => {
                let pod: PodRef = pod.parse()?;
                let into = commands::dir_or_cwd(into)?;
                commands::check_not_volume(&ctx, &into)?;
                let args = LoadArgs {
                    pod,
                    remote,
                    into,
                    strategy,
                    dry_run,
                    json,
                };
                commands::load(&ctx, args).await
            }
            PodCommand::List { remote, json } => commands::list(&ctx, &remote, json).await,
            PodCommand::Versions { pod, remote, json } => {
                commands::versions(&ctx, &pod, &remote, json).await
            }
            PodCommand::Inspect { pod, remote, json } => {
                commands::inspect(&ctx, &pod.parse()?, &remote, json).await
            }
            PodCommand::Delete { pod, remote } => {
                commands::delete(&ctx, &pod.parse()?, &remote).await
            }
        }
    })
}
