//! The CLI commands: each takes validated settings, does the work through [`crate::pod`] and
//! [`crate::remote`], and prints the result (a table, a line, or JSON).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Remotes, VolumeDir, mask_url};
use crate::name::{PodName, PodRef};
use crate::pod::fence;
use crate::pod::load::{Action, LoadParams, Strategy};
use crate::pod::manifest::Kind;
use crate::pod::read::{read_info, read_version, resolve_version};
use crate::pod::save::SaveParams;
use crate::progress::{self, Progress};
use crate::remote::{self, OpenParams, Remote};
use crate::term;

/// What every command needs: the volume dir, the configured remotes, and the shutdown signal.
pub struct Context {
    pub volume: VolumeDir,
    pub remotes: Remotes,
    /// Cancelled on SIGINT/SIGTERM: saves and loads stop and clean up.
    pub shutdown: CancellationToken,
}

impl Context {
    pub fn from_env(shutdown: CancellationToken) -> Result<Self> {
        let volume = VolumeDir::from_env()?;
        let remotes = Remotes::load(&volume)?;
        Ok(Self {
            volume,
            remotes,
            shutdown,
        })
    }

    /// Resolves remote `name`'s URL from the environment and opens its backend.
    pub async fn open_remote(&self, name: &str) -> Result<Arc<dyn Remote>> {
        let template = self.remotes.template(&self.volume, name)?;
        let url = config::resolve(name, &template)?;
        let params = OpenParams {
            staging_dir: Some(self.volume.staging_dir()),
            shutdown: self.shutdown.clone(),
        };
        Ok(remote::open(name, &url, &params).await?)
    }

    fn progress(&self) -> Arc<dyn Progress> {
        Arc::from(progress::for_stderr())
    }
}

pub fn remote_add(ctx: &mut Context, name: &str, url: &str) -> Result<()> {
    ctx.remotes.add(name, url)?;
    println!("Added remote {name} ({})", mask_url(url));
    Ok(())
}

pub fn remote_delete(ctx: &mut Context, name: &str) -> Result<()> {
    ctx.remotes.delete(name)?;
    println!("Deleted remote {name} (its pods stay where they are)");
    Ok(())
}

pub fn remote_list(ctx: &Context, as_json: bool) -> Result<()> {
    let rows: Vec<(String, String)> = ctx
        .remotes
        .list(&ctx.volume)
        .into_iter()
        .map(|(n, u)| (n, mask_url(&u)))
        .collect();
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, u)| json!({"name": n, "url": u}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(4).max(4);
        println!("{:w$}  URL", "NAME");
        for (n, u) in rows {
            println!("{n:w$}  {u}");
        }
    }
    Ok(())
}

/// `podfs save`: its arguments, validated by clap's typed parsers.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// Pod name: letters, digits, '-' and '_'.
    #[arg(value_parser = PodName::new)]
    pub pod: PodName,
    /// Remote to save to.
    #[arg(default_value = config::DEFAULT_REMOTE)]
    pub remote: String,
    /// Directory to save (default: the current directory).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// A message kept with the version.
    #[arg(short, long, default_value = "")]
    pub message: String,
    /// Leave out directories on other file systems (podfs mounts are always left out).
    #[arg(long)]
    pub one_file_system: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn save(ctx: &Context, args: SaveArgs) -> Result<()> {
    let pod = args.pod;
    let dir = dir_or_cwd(args.from)?;
    let from =
        fence::absolute(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let volume = fence::absolute(ctx.volume.root())
        .with_context(|| format!("cannot resolve {}", ctx.volume.root().display()))?;
    if fence::is_within(&from, &volume) {
        bail!(
            "{} is inside podfs's own volume dir {}: choose another directory",
            dir.display(),
            volume.display()
        );
    }
    let remote = ctx.open_remote(&args.remote).await?;
    let params = SaveParams {
        message: args.message,
        creator: config::creator(),
        staging_dir: ctx.volume.staging_dir(),
        exclude: vec![ctx.volume.root().to_owned()],
        one_file_system: args.one_file_system,
        cancel: ctx.shutdown.clone(),
        ..SaveParams::default()
    };
    let out = crate::pod::save::save(&*remote, &pod, &dir, &params, &ctx.progress())
        .await
        .with_context(|| format!("saving {} as pod {pod}", dir.display()))?;
    for s in &out.skipped {
        let path = shown(&s.path);
        match s.fence {
            Some(why) => eprintln!("note: left out {path} ({})", why.describe()),
            None => {
                eprintln!("warning: skipped {path} (sockets, FIFOs and devices cannot be saved)")
            }
        }
    }
    if args.json {
        let v = json!({
            "pod": pod.as_str(), "remote": args.remote, "version": out.version,
            "previous": out.previous, "created": out.version.is_some(),
            "files": out.file_count, "bytes": out.logical_bytes,
            "changed_files": out.changed_files, "stored_bytes": out.stored_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(v) = out.version {
        println!(
            "Saved version {v} of pod {pod} on remote {}: {}, {}; {} new or changed, {} stored",
            args.remote,
            plural(out.file_count, "file"),
            human_bytes(out.logical_bytes),
            out.changed_files,
            human_bytes(out.stored_bytes)
        );
    } else {
        println!(
            "Nothing changed since version {} of pod {pod} on remote {}: no version made",
            out.previous.unwrap_or(0),
            args.remote
        );
    }
    Ok(())
}

/// `podfs load`: its arguments, validated by clap's typed parsers.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// POD or POD:VERSION.
    pub pod: PodRef,
    /// Remote to load from.
    #[arg(default_value = config::DEFAULT_REMOTE)]
    pub remote: String,
    /// Directory to load into (default: the current directory).
    #[arg(long)]
    pub into: Option<PathBuf>,
    /// merge: write the pod's entries and keep other files; overwrite: make the directory
    /// exactly the version.
    #[arg(long, value_enum, default_value_t = StrategyArg::Merge)]
    pub strategy: StrategyArg,
    /// Only list what would be added (+), changed (~) and removed (-).
    #[arg(long)]
    pub dry_run: bool,
    /// Restore setuid and setgid bits (cleared by default: pods store no owners, so the bits
    /// would apply to whoever loads).
    #[arg(long)]
    pub keep_setid: bool,
    /// Neither write into nor remove directories on other file systems (podfs mounts are
    /// always left alone).
    #[arg(long)]
    pub one_file_system: bool,
    #[arg(long)]
    pub json: bool,
}

/// `--strategy`: how a load treats what the directory already holds (the pod layer's
/// [`Strategy`], without clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyArg {
    /// Write the pod's entries over the directory; keep other files.
    Merge,
    /// Make the directory exactly the version: also remove what it does not have.
    Overwrite,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Merge => Strategy::Merge,
            StrategyArg::Overwrite => Strategy::Overwrite,
        }
    }
}

pub async fn load(ctx: &Context, args: LoadArgs) -> Result<()> {
    let into = dir_or_cwd(args.into)?;
    let remote = ctx.open_remote(&args.remote).await?;
    let pod = &args.pod.pod;
    let params = LoadParams {
        strategy: args.strategy.into(),
        dry_run: args.dry_run,
        keep_setid: args.keep_setid,
        one_file_system: args.one_file_system,
        protect: vec![
            ctx.volume.root().to_owned(),
            ctx.volume.staging_dir(),
            ctx.volume.default_pods_dir(),
        ],
        cancel: ctx.shutdown.clone(),
    };
    let plan = crate::pod::load::load(
        &*remote,
        pod,
        args.pod.version,
        &into,
        &params,
        &ctx.progress(),
    )
    .await
    .with_context(|| format!("loading pod {pod} into {}", into.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    for l in &plan.left_alone {
        eprintln!("note: left {} alone ({})", term::escape(&l.path), l.reason);
    }
    if plan.setid_cleared > 0 {
        eprintln!(
            "note: cleared setuid/setgid bits on {} (pods store no owners; --keep-setid restores them)",
            plural(plan.setid_cleared, "path")
        );
    } else if args.keep_setid {
        eprintln!(
            "warning: --keep-setid: setuid/setgid bits are restored as the pod says, on files owned by you"
        );
    }
    if args.dry_run {
        for (path, action) in &plan.changes {
            let sign = match action {
                Action::Add => '+',
                Action::Change => '~',
                Action::Remove => '-',
            };
            println!("{sign} {}", term::escape(path));
        }
    }
    println!(
        "{} version {} of pod {pod} from remote {} into {}: {} added, {} changed, {} removed, {} unchanged",
        if args.dry_run { "Would load" } else { "Loaded" },
        plan.version,
        args.remote,
        shown(&into),
        plan.count(Action::Add),
        plan.count(Action::Change),
        plan.count(Action::Remove),
        plan.unchanged
    );
    Ok(())
}

/// A local path for human output, control characters escaped.
fn shown(path: &Path) -> String {
    term::escape(&path.to_string_lossy()).into_owned()
}

pub async fn list(ctx: &Context, remote_name: &str, as_json: bool) -> Result<()> {
    let remote = ctx.open_remote(remote_name).await?;
    let mut rows = Vec::new();
    for (pod, latest) in remote.list_pods().await? {
        // One damaged pod must not hide the others.
        match read_info(&*remote, &pod, latest).await {
            Ok(info) => rows.push((pod, info)),
            Err(e) => eprintln!("warning: {}", term::error_chain(&e)),
        }
    }
    if as_json {
        let v: Vec<_> = rows
            .iter()
            .map(|(p, i)| {
                json!({"name": p.as_str(), "latest": i.version, "changed": i.created_at,
                       "files": i.file_count, "bytes": i.logical_bytes})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No pods on remote {remote_name}: `podfs save POD {remote_name}` makes one");
        return Ok(());
    }
    let w = rows
        .iter()
        .map(|(p, _)| p.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:w$}  {:>6}  {:20}  {:>10}",
        "NAME", "LATEST", "CHANGED", "SIZE"
    );
    for (p, i) in rows {
        println!(
            "{:w$}  {:>6}  {:20}  {:>10}",
            p.as_str(),
            i.version,
            term::escape(&i.created_at),
            human_bytes(i.logical_bytes)
        );
    }
    Ok(())
}

pub async fn versions(
    ctx: &Context,
    pod: &PodName,
    remote_name: &str,
    as_json: bool,
) -> Result<()> {
    let pod = pod.clone();
    let remote = ctx.open_remote(remote_name).await?;
    let versions = crate::pod::read::versions_of(&*remote, &pod).await?;
    let mut infos = Vec::new();
    for v in versions {
        infos.push(read_info(&*remote, &pod, v).await?);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(());
    }
    println!(
        "{:>7}  {:20}  {:>7}  {:>10}  {:>10}  MESSAGE",
        "VERSION", "CREATED", "FILES", "SIZE", "STORED"
    );
    for i in infos {
        println!(
            "{:>7}  {:20}  {:>7}  {:>10}  {:>10}  {}",
            i.version,
            term::escape(&i.created_at),
            i.file_count,
            human_bytes(i.logical_bytes),
            human_bytes(i.stored_bytes),
            term::escape(&i.message)
        );
    }
    Ok(())
}

pub async fn inspect(ctx: &Context, pod: &PodRef, remote_name: &str, as_json: bool) -> Result<()> {
    let remote = ctx.open_remote(remote_name).await?;
    let version = resolve_version(&*remote, &pod.pod, pod.version).await?;
    let obj = read_version(&*remote, &pod.pod, version).await?;
    if as_json {
        let v = json!({"version": obj.info, "entries": obj.manifest.entries});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let i = &obj.info;
    println!(
        "pod {} version {} on remote {remote_name}: {}, {}, created {}{}",
        i.pod,
        i.version,
        plural(i.file_count, "file"),
        human_bytes(i.logical_bytes),
        term::escape(&i.created_at),
        if i.message.is_empty() {
            String::new()
        } else {
            format!(", \"{}\"", term::escape(&i.message))
        }
    );
    for e in &obj.manifest.entries {
        let (kind, suffix) = match e.kind {
            Kind::Dir => ('d', "/".to_owned()),
            Kind::File => ('-', String::new()),
            Kind::Symlink => (
                'l',
                format!(
                    " -> {}",
                    term::escape(e.target.as_deref().unwrap_or_default())
                ),
            ),
        };
        println!(
            "{kind}{:04o} {:>10}  {}{suffix}",
            e.mode,
            if e.kind == Kind::File {
                human_bytes(e.size)
            } else {
                String::new()
            },
            term::escape(&e.path)
        );
    }
    Ok(())
}

pub async fn delete(ctx: &Context, pod: &PodRef, remote_name: &str) -> Result<()> {
    let remote = ctx.open_remote(remote_name).await?;
    let out = crate::pod::delete::delete(&*remote, &pod.pod, pod.version).await?;
    match pod.version {
        Some(v) => println!(
            "Deleted version {v} of pod {} on remote {remote_name} ({} removed, {} kept: still used by other versions)",
            pod.pod,
            plural(out.states_removed.len() as u64, "state object"),
            out.states_kept.len()
        ),
        None => println!(
            "Deleted pod {} on remote {remote_name} ({})",
            pod.pod,
            plural(out.versions.len() as u64, "version")
        ),
    }
    Ok(())
}

/// The directory a command works on: `given`, else the current directory.
fn dir_or_cwd(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => std::env::current_dir().context("cannot read the current directory"),
    }
}

/// `1 file`, `2 files`.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `podfs mount`: its arguments, validated by clap's typed parsers.
#[derive(Debug, Clone, clap::Args)]
pub struct MountArgs {
    /// An empty directory to show the remotes in.
    pub mountpoint: PathBuf,
    /// Show only this remote (default: every configured remote).
    #[arg(long)]
    pub remote: Option<String>,
    /// Stay attached to the terminal (default: return once mounted and serve in the background).
    #[arg(long)]
    pub foreground: bool,
    /// List pods and versions again at most this often (e.g. 500ms, 10s, 5m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub refresh: std::time::Duration,
    /// Let other users see the mount (needs `user_allow_other` in /etc/fuse.conf unless root).
    #[arg(long)]
    pub allow_other: bool,
    /// Where fetched blocks are kept across mounts (default: the volume dir's cache/).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Bound of the disk cache (e.g. 512M, 10G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub cache_size: u64,
    /// Bound of the memory cache (e.g. 64M).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub memory_cache: u64,
    /// Save a pod once nothing changed in it for this long and no file in it is open for
    /// writing (e.g. 500ms, 2s, 1m). `fsync` and unmounting save at once.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub save_delay: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `512M`, `10G`, `4096`: a size in bytes with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], s[i..].to_ascii_uppercase()),
        None => (s, String::new()),
    };
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "unknown unit in {s:?}: use K, M, G or T (e.g. 512M)"
            ));
        }
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            format!("{s:?} is not a size: use a whole number with K, M, G or T (e.g. 512M)")
        })
}

/// The remotes a mount shows: `--remote NAME`, or every configured one.
fn mount_remote_names(ctx: &Context, args: &MountArgs) -> Result<Vec<String>> {
    match &args.remote {
        Some(name) => {
            ctx.remotes.template(&ctx.volume, name)?;
            Ok(vec![name.clone()])
        }
        None => Ok(ctx
            .remotes
            .list(&ctx.volume)
            .into_iter()
            .map(|(n, _)| n)
            .collect()),
    }
}

/// `podfs mount --foreground`: mounts, serves until SIGINT/SIGTERM (`ctx.shutdown`) or until
/// unmounted from outside, then returns.
pub async fn mount(ctx: &Context, args: MountArgs) -> Result<()> {
    // An unknown --remote fails here, before anything is set up.
    mount_remote_names(ctx, &args)?;
    let point = crate::fs::mountpoint::prepare(&args.mountpoint)?;
    // Bound first: a port in use fails the mount, not a scrape later.
    let listener = match args.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await.with_context(|| {
            format!("cannot serve metrics on {addr} (choose another --metrics address)")
        })?),
        None => None,
    };
    let mut metrics = listener.as_ref().map(|_| crate::metrics::Metrics::new());
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let cache = crate::cache::BlockCache::new(crate::cache::CacheConfig {
        memory_bytes: args.memory_cache,
        disk_dir: Some(
            args.cache_dir
                .clone()
                .unwrap_or_else(|| ctx.volume.root().join("cache")),
        ),
        disk_bytes: args.cache_size,
        ..crate::cache::CacheConfig::default()
    })?;
    let cache = Arc::new(cache);
    if let Some(m) = metrics.as_mut() {
        let collector = crate::cache::metrics::CacheCollector(Arc::clone(&cache));
        m.register_collector(Box::new(collector));
    }
    let metrics = metrics.map(Arc::new);
    let config = crate::fs::FsConfig {
        refresh: args.refresh,
        uid,
        gid,
        staging: Some(ctx.volume.staging_dir()),
        save_delay: args.save_delay,
        creator: config::creator(),
    };
    // Transfers stop when the daemon is done, not at SIGTERM: pending changes are saved after
    // the unmount.
    let transfers = CancellationToken::new();
    let source = MountRemotes {
        volume: ctx.volume.clone(),
        shutdown: transfers.clone(),
        only: args.remote.clone(),
        metrics: metrics.clone(),
    };
    let fs = match &args.remote {
        // One named remote: it must open now, and is shown for the life of the mount.
        Some(name) => {
            let remote = source.open_remote(name).await?;
            crate::fs::PodFs::new(vec![(name.clone(), remote)], config)
        }
        // Every configured remote, following `podfs remote add/delete`.
        None => crate::fs::PodFs::new(Vec::new(), config).following(Arc::new(source)),
    };
    let fs = Arc::new(fs.with_cache(Arc::clone(&cache)));
    fs.refresh_remotes().await;
    fs.start_saving();
    tokio::spawn(Arc::clone(&fs).recover());
    let mount_config = crate::fs::fuse::MountConfig {
        allow_other: args.allow_other,
        metrics: metrics.clone(),
        ..Default::default()
    };
    let rt = tokio::runtime::Handle::current();
    let at = point.clone();
    let fs_handle = Arc::clone(&fs);
    let mounted =
        tokio::task::spawn_blocking(move || crate::fs::fuse::mount(fs, rt, &at, &mount_config))
            .await
            .context("mount task")?
            .with_context(|| format!("cannot mount on {}", point.display()))?;
    tracing::info!("mounted on {}", point.display());
    if let (Some(listener), Some(m)) = (listener, metrics) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics at http://{addr}/metrics");
        }
        tokio::spawn(crate::metrics::serve(
            listener,
            m,
            ctx.shutdown.child_token(),
        ));
    }
    let fs_at_end = Arc::clone(&fs_handle);
    let served = mounted.serve(ctx.shutdown.clone()).await;
    fs_at_end.save_all().await;
    fs_at_end.stop_saving();
    transfers.cancel();
    served?;
    // Blocks fetched last are on their way to the disk cache: keep them for the next mount.
    cache.flush().await;
    Ok(())
}

/// The remotes of a mount, from the configuration as it is when asked.
struct MountRemotes {
    volume: VolumeDir,
    shutdown: CancellationToken,
    /// `--remote NAME`.
    only: Option<String>,
    /// Counts every remote's requests, if the mount serves metrics.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl MountRemotes {
    /// Opens `name` as the configuration file says now.
    async fn open_remote(&self, name: &str) -> Result<Arc<dyn Remote>> {
        let ctx = Context {
            volume: self.volume.clone(),
            remotes: Remotes::load(&self.volume)?,
            shutdown: self.shutdown.clone(),
        };
        let remote: Arc<dyn Remote> = Arc::new(crate::remote::failfast::FailFast::new(
            ctx.open_remote(name).await?,
        ));
        Ok(match &self.metrics {
            Some(m) => Arc::new(crate::remote::metered::Metered::new(remote, Arc::clone(m))),
            None => remote,
        })
    }
}

#[async_trait::async_trait]
impl crate::fs::RemoteSource for MountRemotes {
    fn configured(&self) -> std::result::Result<Vec<(String, String)>, String> {
        let remotes = Remotes::load(&self.volume).map_err(|e| term::error_chain(&e))?;
        Ok(remotes
            .list(&self.volume)
            .into_iter()
            .filter(|(n, _)| self.only.as_ref().is_none_or(|o| o == n))
            .collect())
    }

    async fn open(&self, name: &str) -> std::result::Result<Arc<dyn Remote>, String> {
        self.open_remote(name)
            .await
            .map_err(|e| term::error_chain(e.as_ref()))
    }
}

/// How long `podfs mount` waits for its background daemon to be mounted.
const MOUNT_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `podfs mount` without `--foreground`: checks what it can, starts itself with `--foreground`
/// detached (new session, output to a log file in the volume dir), and returns once the mount
/// point is a podfs mount, or fails with the daemon's error if it exits first. Called before any
/// runtime exists: nothing forks a multi-threaded process.
pub fn mount_in_background(ctx: &Context, args: &MountArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    mount_remote_names(ctx, args)?;
    let point = crate::fs::mountpoint::prepare(&args.mountpoint)?;
    let volume = fence::absolute(ctx.volume.root())
        .with_context(|| format!("cannot resolve {}", ctx.volume.root().display()))?;
    let logs = volume.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let log_path = logs.join(format!(
        "mount-{}.log",
        point
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "_")
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the podfs executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount")
        .arg(&point)
        .arg("--foreground")
        .arg("--refresh")
        .arg(humantime::format_duration(args.refresh).to_string());
    if let Some(r) = &args.remote {
        cmd.arg("--remote").arg(r);
    }
    cmd.arg("--cache-size")
        .arg(args.cache_size.to_string())
        .arg("--memory-cache")
        .arg(args.memory_cache.to_string());
    if let Some(dir) = &args.cache_dir {
        // The daemon runs in `/`: a relative directory is the caller's.
        let dir = fence::absolute(dir)
            .with_context(|| format!("cannot resolve --cache-dir {}", dir.display()))?;
        cmd.arg("--cache-dir").arg(dir);
    }
    if args.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(addr) = args.metrics {
        cmd.arg("--metrics").arg(addr.to_string());
    }
    cmd.env("PODFS_HOME", &volume)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and only detaches the child from our terminal and
    // process group, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount daemon")?;
    let started = std::time::Instant::now();
    loop {
        if crate::fs::mountpoint::podfs_mount_at(&point).is_some() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("mount daemon")? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let line = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!(
                        "the mount daemon exited ({status}); see {}",
                        log_path.display()
                    )
                });
            bail!("{line}");
        }
        if started.elapsed() > MOUNT_READY_TIMEOUT {
            // The daemon may still be waiting on a remote: it is left to finish or fail.
            bail!(
                "{} is not mounted after {}s: see {}",
                point.display(),
                MOUNT_READY_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `podfs unmount`: unmounts a podfs mount (lazily if its daemon is gone).
/// `podfs unmount`: saves the changes staged in the mount first (an `fsync` of its root, which
/// commits every pod with changes), then unmounts. If they cannot be saved, they stay staged and
/// the next mount saves them; the unmount goes ahead.
pub fn unmount(point: &Path) -> Result<()> {
    let staged = pods_with_staged_changes();
    if !staged.is_empty() {
        eprintln!(
            "Saving the changes staged for {} before unmounting…",
            staged.join(", ")
        );
    }
    // A dead mount (ENOTCONN) or a path that is not a mount fails here: unmount says why.
    if let Ok(root) = std::fs::File::open(point) {
        match root.sync_all() {
            Ok(()) if !staged.is_empty() => eprintln!("Saved."),
            Ok(()) => {}
            Err(e) => eprintln!(
                "warning: the staged changes could not be saved ({e}; the mount's log says why): \
                 they stay staged and the next `podfs mount` saves them"
            ),
        }
    }
    crate::fs::mountpoint::unmount(point)?;
    Ok(())
}

/// `REMOTE/POD` of every pod with changes staged by a mount of this volume dir.
fn pods_with_staged_changes() -> Vec<String> {
    let Ok(volume) = VolumeDir::from_env() else {
        return Vec::new();
    };
    crate::fs::staged_pods(&volume.staging_dir())
        .into_iter()
        .map(|(remote, pod)| format!("{remote}/{pod}"))
        .collect()
}
