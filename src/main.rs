//! The `podfs` command line: parses arguments and dispatches to [`podfs::commands`].

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use podfs::commands::{self, Context, LoadArgs, MountArgs, SaveArgs};
use podfs::config::DEFAULT_REMOTE;
use podfs::name::{NameError, PodName, PodRef};
use podfs::term;
use tokio_util::sync::CancellationToken;

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
    /// Unmount a podfs mount (also one whose daemon died: the mount point reports ENOTCONN).
    Unmount { mountpoint: std::path::PathBuf },
    #[command(flatten)]
    Pod(PodCommand),
}

/// The commands that work on pods (they need the async runtime).
#[derive(Subcommand)]
enum PodCommand {
    /// Save a directory as the next version of a pod.
    Save(SaveArgs),
    /// Load a version of a pod (default: the latest) into a directory.
    Load(LoadArgs),
    /// List the pods on a remote.
    List {
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// List the versions of a pod.
    Versions {
        #[arg(value_parser = parse_pod_name)]
        pod: PodName,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the tree of a version (default: the latest).
    Inspect {
        /// POD or POD:VERSION.
        pod: PodRef,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete one version (POD:VERSION) or a whole pod (POD).
    Delete {
        /// POD or POD:VERSION.
        pod: PodRef,
        #[arg(default_value = DEFAULT_REMOTE)]
        remote: String,
    },
    /// Mount the remotes read-only: MOUNTPOINT/REMOTE/POD/ is the latest version,
    /// POD/.versions/N/ every version.
    Mount(MountArgs),
}

fn parse_pod_name(s: &str) -> Result<PodName, NameError> {
    PodName::new(s)
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A bad pod name or version is bad input like any other: one line, naming the rule.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
            ) =>
        {
            let text = e.to_string();
            eprintln!("{}", term::escape(text.lines().next().unwrap_or_default()));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODFS_LOG")
                // aws-config logs each failed credential provider with a debug dump at `warn`;
                // the S3 backend reports the outcome itself, in one line.
                // A mount's log says what it saved.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,aws_config=error,podfs::fs::saver=info,podfs::fs::workspace=info",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("error: {}", term::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
        Err(Failure::Signal(signal, e)) => {
            let what = e.map(|e| term::error_chain(e.as_ref()));
            eprintln!(
                "error: interrupted by {}{}",
                signal.name(),
                what.map(|w| format!(" ({w})")).unwrap_or_default()
            );
            ExitCode::from(128 + signal.number())
        }
    }
}

/// How a command ended, if not well.
enum Failure {
    Error(anyhow::Error),
    /// Stopped by a signal; with the command's own error if it stopped by itself.
    Signal(Signal, Option<anyhow::Error>),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Int,
    Term,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }
    fn number(self) -> u8 {
        match self {
            Signal::Int => 2,
            Signal::Term => 15,
        }
    }
}

/// Waits for the first SIGINT or SIGTERM and cancels `shutdown`; a second signal exits at once.
async fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let first = tokio::select! {
        _ = int.recv() => Signal::Int,
        _ = term.recv() => Signal::Term,
    };
    shutdown.cancel();
    tokio::spawn(async move {
        let again = tokio::select! {
            _ = int.recv() => Signal::Int,
            _ = term.recv() => Signal::Term,
        };
        eprintln!("error: interrupted again by {}: exiting now", again.name());
        std::process::exit(128 + i32::from(again.number()));
    });
    Ok(first)
}

/// How long a command that cleans up after itself (save, load) may take to stop once told to.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

fn run(cli: Cli) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    let mut ctx = Context::from_env(shutdown.clone())?;
    let command = match cli.command {
        Command::Remote { command } => {
            return Ok(match command {
                RemoteCommand::Add { name, url } => commands::remote_add(&mut ctx, &name, &url),
                RemoteCommand::Delete { name } => commands::remote_delete(&mut ctx, &name),
                RemoteCommand::List { json } => commands::remote_list(&ctx, json),
            }?);
        }
        Command::Unmount { mountpoint } => return Ok(commands::unmount(&mountpoint)?),
        // The daemon is started before any runtime exists: never fork a multi-threaded process.
        Command::Pod(PodCommand::Mount(args)) if !args.foreground => {
            return Ok(commands::mount_in_background(&ctx, &args)?);
        }
        Command::Pod(command) => command,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    runtime.block_on(async {
        // Save, load and mount watch `shutdown` and clean up (temporary files, partial uploads,
        // the mount) before they return; the other commands only read, or delete, and are
        // simply dropped.
        let cleans_up = matches!(
            command,
            PodCommand::Save { .. } | PodCommand::Load { .. } | PodCommand::Mount(_)
        );
        let work = dispatch(&ctx, command);
        tokio::pin!(work);
        let signals = watch_signals(shutdown.clone());
        tokio::select! {
            r = &mut work => Ok(r?),
            signal = signals => {
                let signal = signal?;
                if !cleans_up {
                    return Err(Failure::Signal(signal, None));
                }
                match tokio::time::timeout(STOP_GRACE, &mut work).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(Failure::Signal(signal, Some(e))),
                    Err(_) => Err(Failure::Signal(signal, None)),
                }
            }
        }
    })
}

async fn dispatch(ctx: &Context, command: PodCommand) -> anyhow::Result<()> {
    match command {
        PodCommand::Save(args) => commands::save(ctx, args).await,
        PodCommand::Load(args) => commands::load(ctx, args).await,
        PodCommand::List { remote, json } => commands::list(ctx, &remote, json).await,
        PodCommand::Versions { pod, remote, json } => {
            commands::versions(ctx, &pod, &remote, json).await
        }
        PodCommand::Inspect { pod, remote, json } => {
            commands::inspect(ctx, &pod, &remote, json).await
        }
        PodCommand::Delete { pod, remote } => commands::delete(ctx, &pod, &remote).await,
        PodCommand::Mount(args) => commands::mount(ctx, args).await,
    }
}
