//! Data parallelism across processes and machines: a process group (rank, world size) joined at a
//! coordinator, and a ring all-reduce of host `f32` buffers between its processes, over burn's
//! network layer (`burn-communication`: websocket channels with a dead-peer keep-alive, the
//! transport of burn-remote).
//!
//! Launch follows torchrun: every process runs the same command with its own rank; rank 0
//! listens at the coordinator address, the others join it there and learn each other's
//! addresses; each process then opens one channel to the next rank of the ring and accepts one
//! from the previous. An all-reduce is the bandwidth-optimal ring (reduce-scatter, then
//! all-gather: each process sends and receives 2·(N−1)/N of the buffer); every process ends with
//! bit-identical sums, so replicas that apply the same optimiser step stay identical.
//!
//! Why not burn-collective: its newest release (0.21.0) is built on burn-backend 0.21, not the
//! 0.22.1 this crate uses, and its global (multi-node) level completes one all-reduce per
//! registration: `SyncService::sync` clears a copy of its list of synced peers, so the second
//! all-reduce waits forever (measured: two processes on loopback, the first all-reduce of 1 M
//! floats in 62–77 ms, the second never returned). burn 0.22.1's own `DistributedOps` are
//! in-process only, and on the CPU backends their `all_reduce` is unimplemented.
//!
//! Failure behaviour: a peer that exits (a crash, a kill, an error of its own) closes its
//! channels, which the others notice at their next exchange; a peer that vanishes without
//! closing (a machine or network failure) is dropped by TCP keep-alive within about 30 s; a peer
//! that neither answers nor closes is given up after `--peer-timeout`. Each case ends the process
//! with one line naming the peer; the run resumes from its last checkpoint with `--resume`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn_communication::websocket::{WsClient, WsClientChannel, WsServer, WsServerChannel};
use burn_communication::{Address, CommunicationChannel, Message, ProtocolClient, ProtocolServer};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// How a process joins a multi-process run (the flags `--nodes`, `--node-rank`,
/// `--coordinator`, `--node-address`, `--peer-timeout`, or torchrun's environment variables).
#[derive(Debug, Clone)]
pub struct Launch {
    /// Number of processes (torchrun's WORLD_SIZE).
    pub nodes: usize,
    /// This process's rank, `0..nodes`; rank 0 is the coordinator and the one that writes.
    pub rank: usize,
    /// Where rank 0 listens and the others join (MASTER_ADDR, MASTER_PORT).
    pub coordinator_host: String,
    pub coordinator_port: u16,
    /// Host (and optionally port) the other processes reach this one at; by default the
    /// address of the interface that routes to the coordinator, and port coordinator port + rank.
    pub node_address: Option<String>,
    /// How long to wait for peers: to join, and for each exchange.
    pub timeout: Duration,
}

impl Launch {
    /// The host and port this process listens at (rank 0: the coordinator's port).
    fn own_endpoint(&self) -> Result<(String, u16)> {
        let default_port = self
            .coordinator_port
            .checked_add(self.rank as u16)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--coordinator: port {} + rank {} is past 65535; give --node-address HOST:PORT",
                    self.coordinator_port, self.rank
                ))
            })?;
        let (host, port) = match &self.node_address {
            Some(a) => match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && !h.ends_with(':') => {
                    let p = p.parse::<u16>().map_err(|_| {
                        Error::Usage(format!(
                            "--node-address {a}: expected HOST or HOST:PORT with a port in 1..65535"
                        ))
                    })?;
                    (h.to_string(), p)
                }
                _ => (a.clone(), default_port),
            },
            None => (self.route_to_coordinator()?, default_port),
        };
        if self.rank == 0 && port != self.coordinator_port {
            return Err(Error::Usage(format!(
                "--node-address: rank 0 listens at the coordinator's port {}, not {port}",
                self.coordinator_port
            )));
        }
        Ok((host, port))
    }

    /// The local address of the interface that routes to the coordinator (no packet is sent:
    /// a UDP socket's `connect` only picks the route).
    fn route_to_coordinator(&self) -> Result<String> {
        let target = self.coordinator_socket()?;
        if target.ip().is_loopback() {
            return Ok(target.ip().to_string());
        }
        let any = if target.is_ipv6() { "::" } else { "0.0.0.0" };
        let local = UdpSocket::bind((any, 0))
            .and_then(|s| {
                s.connect(target)?;
                s.local_addr()
            })
            .map_err(|e| {
                Error::Usage(format!(
                    "--coordinator {}: no route to it from this machine ({e}); give --node-address",
                    self.coordinator()
                ))
            })?;
        Ok(local.ip().to_string())
    }

    fn coordinator(&self) -> String {
        format!("{}:{}", self.coordinator_host, self.coordinator_port)
    }

    fn coordinator_socket(&self) -> Result<SocketAddr> {
        self.coordinator()
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--coordinator {}: cannot resolve the host",
                    self.coordinator()
                ))
            })
    }
}

/// A timeout as written on the command line: `300`, `0.5`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// Addresses are written `ws://host:port`; an IPv6 host gets brackets.
fn ws_address(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("ws://[{ip}]:{port}"),
        _ => format!("ws://{host}:{port}"),
    }
}

/// What a rank sends to the coordinator when it joins.
#[derive(Serialize, Deserialize)]
struct Join {
    rank: usize,
    nodes: usize,
    address: String,
    /// The command being run (`train`, `distill progressive`): every rank must run the same.
    job: String,
}

/// The coordinator's answer: every rank's address, or why the run cannot start.
#[derive(Serialize, Deserialize)]
enum JoinReply {
    Addresses(Vec<String>),
    Refused(String),
}

/// The first message on a ring channel: who is on the other end.
#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
}

fn encode<T: Serialize>(value: &T) -> Message {
    Message::new(
        serde_json::to_vec(value)
            .expect("plain data serializes")
            .into(),
    )
}

fn decode<T: for<'de> Deserialize<'de>>(message: &Message) -> Option<T> {
    serde_json::from_slice(&message.data).ok()
}

/// A joined group of processes with its ring channels.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    /// Every rank's address, for messages that name a peer.
    addresses: Vec<String>,
    timeout: Duration,
    /// Channel to rank + 1 (sent on) and from rank − 1 (received on); `None` for a world of one.
    ring: Option<(WsClientChannel, WsServerChannel)>,
    /// Whether the replicas were found identical before their first gradient exchange.
    replicas_checked: bool,
    /// All-reduces so far, the floats they summed and their wall time (the overhead report).
    reduces: usize,
    reduced_floats: usize,
    reduce_time: Duration,
    /// The most floats one message carries.
    piece_floats: usize,
    /// Stops this process's server when the group is dropped.
    _shutdown: tokio::sync::oneshot::Sender<()>,
    runtime: tokio::runtime::Runtime,
}

impl ProcessGroup {
    /// Joins the group described by `launch`: rank 0 waits at the coordinator address for the
    /// others (at most `launch.timeout`), the others connect to it (retrying for as long), then
    /// every rank connects to the next one of the ring.
    pub fn join(launch: &Launch, job: &str) -> Result<Self> {
        if launch.nodes == 0 || launch.rank >= launch.nodes {
            return Err(Error::Usage(format!(
                "--node-rank {}: expected a rank in 0..{} (--nodes {})",
                launch.rank, launch.nodes, launch.nodes
            )));
        }
        let (host, port) = launch.own_endpoint()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fewstep-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Backend(format!("cannot start the network runtime: {e}")))?;
        let flag = if launch.rank == 0 {
            format!("--coordinator {}", launch.coordinator())
        } else {
            format!("--node-address {}", ws_address(&host, port))
        };
        // Every interface, of the address family this process is reached at.
        let any = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => "::",
            _ => "0.0.0.0",
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((any, port)))
            .map_err(|e| Error::Usage(format!("{flag}: cannot listen on port {port}: {e}")))?;
        let (join_tx, join_rx) = mpsc::unbounded_channel::<WsServerChannel>();
        let (ring_tx, ring_rx) = mpsc::unbounded_channel::<WsServerChannel>();
        let mut server = WsServer::new(port).route("/ring", move |channel| async move {
            let _ = ring_tx.send(channel);
        });
        if launch.rank == 0 {
            server = server.route("/join", move |channel| async move {
                let _ = join_tx.send(channel);
            });
        }
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(server.serve_on(listener, async move {
            let _ = stop.await;
        }));
        let own = ws_address(&host, port);
        let deadline = Instant::now() + launch.timeout;
        let addresses = if launch.rank == 0 {
            runtime.block_on(coordinate(launch, job, own, join_rx, deadline))?
        } else {
            runtime.block_on(join_coordinator(launch, job, own, deadline))?
        };
        let ring = if launch.nodes > 1 {
            Some(runtime.block_on(connect_ring(
                launch.rank,
                &addresses,
                ring_rx,
                deadline + launch.timeout,
            ))?)
        } else {
            None
        };
        Ok(Self {
            rank: launch.rank,
            world: launch.nodes,
            addresses,
            timeout: launch.timeout,
            ring,
            replicas_checked: false,
            reduces: 0,
            reduced_floats: 0,
            reduce_time: Duration::ZERO,
            piece_floats: 1 << 24,
            _shutdown: shutdown,
            runtime,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `data` element-wise over every process of the group, in place; every process ends
    /// with the same bits. `data` must have the same length on every process.
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let n = self.world;
        if n == 1 {
            return Ok(());
        }
        let started = Instant::now();
        let chunks = crate::train::data_parallel::shards(data.len(), n);
        let r = self.rank;
        // Reduce-scatter: after n − 1 exchanges rank r holds the whole sum of chunk r + 1.
        for s in 0..n - 1 {
            let send = chunks[(r + n - s) % n].clone();
            let recv = chunks[(r + 2 * n - s - 1) % n].clone();
            let got = self.transfer(data, send, recv.len())?;
            for (d, x) in data[recv].iter_mut().zip(got) {
                *d += x;
            }
        }
        // All-gather: the finished chunks travel once around the ring.
        for s in 0..n - 1 {
            let send = chunks[(r + 1 + n - s) % n].clone();
            let recv = chunks[(r + n - s) % n].clone();
            let got = self.transfer(data, send, recv.len())?;
            data[recv].copy_from_slice(&got);
        }
        self.reduces += 1;
        self.reduced_floats += data.len();
        self.reduce_time += started.elapsed();
        Ok(())
    }

    /// One line on the all-reduces so far: how many, their size, their mean wall time (which
    /// includes waiting for the slowest process).
    pub fn overhead_report(&self) -> Option<String> {
        (self.reduces > 0).then(|| {
            format!(
                "{} processes: {} gradient all-reduces of {:.1} MB, {:.1} ms each on average (waits for the slowest process included)",
                self.world,
                self.reduces,
                self.reduced_floats as f64 * 4.0 / self.reduces as f64 / 1e6,
                self.reduce_time.as_secs_f64() * 1e3 / self.reduces as f64
            )
        })
    }

    /// Returns once every rank of the group has called it: a token goes n − 1 times around the
    /// ring, so after the last exchange each rank has heard, through its predecessors, from
    /// every other. Not counted in [`Self::overhead_report`].
    pub fn barrier(&mut self) -> Result<()> {
        for _ in 1..self.world {
            self.exchange(Some(&[0.0]), Some(1))?;
        }
        Ok(())
    }

    /// Every rank's copy of `values` (the same length everywhere), in rank order.
    pub fn all_gather(&mut self, values: &[f32]) -> Result<Vec<Vec<f32>>> {
        let k = values.len();
        let mut all = vec![0.0f32; k * self.world];
        all[self.rank * k..(self.rank + 1) * k].copy_from_slice(values);
        self.all_reduce_sum(&mut all)?;
        Ok(all.chunks(k.max(1)).map(|c| c.to_vec()).collect())
    }

    /// Whether [`Self::check_replicas`] has passed.
    pub fn replicas_checked(&self) -> bool {
        self.replicas_checked
    }

    /// Fails unless every rank holds the same `fingerprint` of its replica (checked once, before
    /// the first gradient exchange): a rank resumed from another checkpoint, or started with
    /// other settings, would train a different model and average nonsense into the others.
    pub fn check_replicas(&mut self, fingerprint: &[f32]) -> Result<()> {
        if self.replicas_checked {
            return Ok(());
        }
        let all = self.all_gather(fingerprint)?;
        if let Some(other) = all.iter().position(|f| f.as_slice() != all[0].as_slice()) {
            return Err(Error::Usage(format!(
                "--nodes: rank {other}'s model differs from rank 0's before the first step: every \
                 process must start from the same settings and, with --resume, the same run \
                 folder (a shared filesystem or a copy of rank 0's)"
            )));
        }
        self.replicas_checked = true;
        Ok(())
    }

    /// Sends `data[send]` to the next rank while receiving `recv_len` floats from the previous
    /// one, in messages of at most `piece_floats` (a websocket message is limited to 1 GiB).
    /// Each side cuts a chunk the same way, so pieces pair up.
    fn transfer(&mut self, data: &[f32], send: Range<usize>, recv_len: usize) -> Result<Vec<f32>> {
        let size = self.piece_floats.max(1);
        let pieces = |len: usize| len.div_ceil(size).max(1);
        let (ps, pr) = (pieces(send.len()), pieces(recv_len));
        let mut got = Vec::with_capacity(recv_len);
        for p in 0..ps.max(pr) {
            let out = (p < ps).then(|| {
                let start = send.start + p * size;
                &data[start..(start + size).min(send.end)]
            });
            let want = (p < pr).then(|| size.min(recv_len - p * size));
            if let Some(v) = self.exchange(out, want)? {
                got.extend(v);
            }
        }
        Ok(got)
    }

    /// Sends `out` (if any) to the next rank while receiving `len` floats (if any) from the
    /// previous one.
    fn exchange(&mut self, out: Option<&[f32]>, len: Option<usize>) -> Result<Option<Vec<f32>>> {
        let (rank, world, timeout) = (self.rank, self.world, self.timeout);
        let prev = (rank + world - 1) % world;
        let next = (rank + 1) % world;
        let (to_next, from_prev) = self
            .ring
            .as_mut()
            .expect("a group of more than one process has its ring");
        let bytes: Option<Vec<u8>> = out.map(|o| o.iter().flat_map(|x| x.to_le_bytes()).collect());
        let (sent, received) = self.runtime.block_on(async {
            tokio::join!(
                async {
                    match bytes {
                        Some(b) => Some(
                            tokio::time::timeout(timeout, to_next.send(Message::new(b.into())))
                                .await,
                        ),
                        None => None,
                    }
                },
                async {
                    match len {
                        Some(_) => Some(tokio::time::timeout(timeout, from_prev.recv()).await),
                        None => None,
                    }
                }
            )
        });
        let peer = |r: usize| format!("rank {r} ({})", self.addresses[r]);
        let gone = |r: usize, why: &str| {
            Error::Backend(format!(
                "{} {why}: that process stopped (it crashed, was killed or failed); restart \
                 every process with --resume to continue from the last checkpoint",
                peer(r)
            ))
        };
        let silent = |r: usize| {
            Error::Backend(format!(
                "{} did not answer for {} s (--peer-timeout): stopped; restart every process \
                 with --resume to continue from the last checkpoint",
                peer(r),
                seconds(timeout)
            ))
        };
        match sent {
            Some(Err(_)) => return Err(silent(next)),
            Some(Ok(Err(_))) => return Err(gone(next, "refused data")),
            Some(Ok(Ok(()))) | None => {}
        }
        let (Some(len), Some(received)) = (len, received) else {
            return Ok(None);
        };
        let message = match received {
            Err(_) => return Err(silent(prev)),
            Ok(Err(_)) => return Err(gone(prev, "dropped its connection")),
            Ok(Ok(None)) => return Err(gone(prev, "closed its connection")),
            Ok(Ok(Some(m))) => m,
        };
        if message.data.len() != 4 * len {
            return Err(Error::Backend(format!(
                "{} sent {} bytes where {} were expected: the processes run different models \
                 or settings",
                peer(prev),
                message.data.len(),
                4 * len
            )));
        }
        Ok(Some(
            message
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }
}

/// Rank 0: waits for every other rank's join, checks them, and answers each with the address
/// list (or with the reason the run cannot start, which is then this process's error too).
async fn coordinate(
    launch: &Launch,
    job: &str,
    own: String,
    mut joins: mpsc::UnboundedReceiver<WsServerChannel>,
    deadline: Instant,
) -> Result<Vec<String>> {
    let n = launch.nodes;
    let mut addresses: Vec<Option<String>> = vec![None; n];
    addresses[0] = Some(own);
    let mut channels: Vec<WsServerChannel> = Vec::new();
    let mut problem: Option<String> = None;
    while problem.is_none() && addresses.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(mut channel)) = tokio::time::timeout(left, joins.recv()).await else {
            let missing: Vec<String> = (0..n)
                .filter(|&r| addresses[r].is_none())
                .map(|r| r.to_string())
                .collect();
            problem = Some(format!(
                "--coordinator {}: rank(s) {} of --nodes {n} did not join within {} s \
                 (--peer-timeout)",
                launch.coordinator(),
                missing.join(", "),
                seconds(launch.timeout)
            ));
            break;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let join = match tokio::time::timeout(left, channel.recv()).await {
            Ok(Ok(Some(m))) => decode::<Join>(&m),
            _ => continue, // a connection that said nothing: not a fewstep rank
        };
        let Some(join) = join else {
            continue;
        };
        problem = if join.nodes != n {
            Some(format!(
                "--nodes: rank {} was started with --nodes {}, rank 0 with --nodes {n}",
                join.rank, join.nodes
            ))
        } else if join.rank == 0 || join.rank >= n || addresses[join.rank].is_some() {
            Some(format!(
                "--node-rank: two processes claim rank {} (ranks are 0..{n}, each once)",
                join.rank
            ))
        } else if join.job != job {
            Some(format!(
                "rank {} runs `{}` while rank 0 runs `{job}`: every process runs the same command",
                join.rank, join.job
            ))
        } else {
            addresses[join.rank] = Some(join.address);
            None
        };
        channels.push(channel);
    }
    let reply = match &problem {
        Some(p) => JoinReply::Refused(p.clone()),
        None => JoinReply::Addresses(addresses.iter().flatten().cloned().collect()),
    };
    let message = serde_json::to_vec(&reply).expect("plain data serializes");
    for channel in &mut channels {
        let _ = channel.send(Message::new(message.clone().into())).await;
    }
    match (problem, reply) {
        (Some(p), _) => Err(Error::Usage(p)),
        (None, JoinReply::Addresses(a)) => Ok(a),
        (None, JoinReply::Refused(p)) => Err(Error::Usage(p)),
    }
}

/// Ranks 1..: connects to the coordinator (retrying until `deadline`: rank 0 may start later),
/// joins, and waits for the address list.
async fn join_coordinator(
    launch: &Launch,
    job: &str,
    own: String,
    deadline: Instant,
) -> Result<Vec<String>> {
    let coordinator = ws_address(&launch.coordinator_host, launch.coordinator_port);
    let mut channel = connect_until(&coordinator, "join", deadline)
        .await
        .ok_or_else(|| {
            Error::Backend(format!(
                "--coordinator {}: rank 0 could not be reached within {} s (--peer-timeout); \
                 is it running, and is the port open?",
                launch.coordinator(),
                seconds(launch.timeout)
            ))
        })?;
    let join = Join {
        rank: launch.rank,
        nodes: launch.nodes,
        address: own,
        job: job.to_string(),
    };
    let lost = || {
        Error::Backend(format!(
            "--coordinator {}: rank 0 closed the connection before the run started",
            launch.coordinator()
        ))
    };
    channel.send(encode(&join)).await.map_err(|_| lost())?;
    // Rank 0 answers once every rank has joined, or when its own wait ends.
    let wait = deadline.saturating_duration_since(Instant::now()) + launch.timeout;
    let reply = match tokio::time::timeout(wait, channel.recv()).await {
        Ok(Ok(Some(m))) => decode::<JoinReply>(&m).ok_or_else(lost)?,
        Ok(_) => return Err(lost()),
        Err(_) => {
            return Err(Error::Backend(format!(
                "--coordinator {}: rank 0 did not start the run within {} s (--peer-timeout)",
                launch.coordinator(),
                seconds(wait)
            )));
        }
    };
    match reply {
        JoinReply::Addresses(a) if a.len() == launch.nodes => Ok(a),
        JoinReply::Addresses(_) => Err(lost()),
        JoinReply::Refused(why) => Err(Error::Usage(why)),
    }
}

/// Opens this rank's channel to the next one and accepts the previous one's.
async fn connect_ring(
    rank: usize,
    addresses: &[String],
    mut incoming: mpsc::UnboundedReceiver<WsServerChannel>,
    deadline: Instant,
) -> Result<(WsClientChannel, WsServerChannel)> {
    let n = addresses.len();
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let mut to_next = connect_until(&addresses[next], "ring", deadline)
        .await
        .ok_or_else(|| {
            Error::Backend(format!(
                "rank {next} at {} cannot be reached from rank {rank}: check --node-address and \
                 that its port is open",
                addresses[next]
            ))
        })?;
    to_next
        .send(encode(&Hello { rank }))
        .await
        .map_err(|e| Error::Backend(format!("rank {next} at {}: {e:?}", addresses[next])))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(mut channel)) = tokio::time::timeout(left, incoming.recv()).await else {
            return Err(Error::Backend(format!(
                "rank {prev} at {} did not connect to rank {rank} in time: can it reach this \
                 machine's address?",
                addresses[prev]
            )));
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(Some(m))) = tokio::time::timeout(left, channel.recv()).await
            && decode::<Hello>(&m).is_some_and(|h| h.rank == prev)
        {
            return Ok((to_next, channel));
        }
    }
}

/// Connects to `address`'s `route`, retrying every 200 ms until `deadline`.
async fn connect_until(address: &str, route: &str, deadline: Instant) -> Option<WsClientChannel> {
    let address: Address = address.parse().ok()?;
    loop {
        if let Ok(channel) = WsClient::connect(address.clone(), route).await {
            return Some(channel);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

static GROUP: Mutex<Option<ProcessGroup>> = Mutex::new(None);

/// Makes `group` this process's group: the data-parallel gradient step
/// ([`crate::train::data_parallel::loss_and_grads`]) then splits each batch across its
/// processes and all-reduces the gradients (the default group of torch.distributed).
pub fn init(group: ProcessGroup) {
    *GROUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(group);
}

/// Runs `f` on this process's group, if it joined one.
pub fn with_group<R>(f: impl FnOnce(&mut ProcessGroup) -> R) -> Option<R> {
    GROUP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .map(f)
}

/// This process's rank and the group's size; `(0, 1)` outside a group.
pub fn rank_and_world() -> (usize, usize) {
    with_group(|g| (g.rank(), g.world())).unwrap_or((0, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(nodes: usize, rank: usize, port: u16) -> Launch {
        Launch {
            nodes,
            rank,
            coordinator_host: "127.0.0.1".into(),
            coordinator_port: port,
            node_address: None,
            timeout: Duration::from_secs(20),
        }
    }

    /// Runs `f(rank, group)` on `n` threads, each joined to the group at `port` as its rank;
    /// the results in rank order.
    fn on_each_rank<R: Send + 'static>(
        n: usize,
        port: u16,
        f: fn(usize, ProcessGroup) -> R,
    ) -> Vec<R> {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                std::thread::spawn(move || {
                    f(
                        rank,
                        ProcessGroup::join(&launch(n, rank, port), "test").unwrap(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn three_processes_sum_and_agree() {
        let results: Vec<Vec<Vec<f32>>> = on_each_rank(3, 31_731, |rank, mut g| {
            // Chunks of 334 floats go as pieces of 64, the last one shorter.
            g.piece_floats = 64;
            let mut sums = Vec::new();
            for step in 0..3 {
                // Lengths that leave the ring's chunks uneven, and one shorter than it.
                for len in [7usize, 2, 1000] {
                    let mut v: Vec<f32> = (0..len)
                        .map(|i| (rank * 1000 + i + step) as f32 * 0.5)
                        .collect();
                    g.all_reduce_sum(&mut v).unwrap();
                    sums.push(v);
                }
            }
            sums
        });
        let mut k = 0;
        for step in 0..3 {
            for len in [7usize, 2, 1000] {
                let want: Vec<f32> = (0..len)
                    .map(|i| (0..3).map(|r| (r * 1000 + i + step) as f32 * 0.5).sum())
                    .collect();
                for r in &results {
                    assert_eq!(r[k], want, "step {step}, len {len}");
                }
                k += 1;
            }
        }
    }

    #[test]
    fn a_barrier_holds_every_rank_until_the_last_arrives() {
        let times: Vec<(Instant, Instant)> = on_each_rank(3, 31_871, |rank, mut g| {
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let arrived = Instant::now();
            g.barrier().unwrap();
            let left = Instant::now();
            // The group still sums after it: the barrier left no message behind.
            let mut v = vec![1.0f32; 5];
            g.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, vec![3.0f32; 5]);
            assert_eq!(g.reduces, 1, "the barrier is not an all-reduce");
            (arrived, left)
        });
        // No rank leaves before the last one (rank 2, late) has arrived: the same clock for all.
        let last = times.iter().map(|t| t.0).max().unwrap();
        for (rank, &(_, left)) in times.iter().enumerate() {
            assert!(
                left >= last,
                "rank {rank} left the barrier before every rank arrived"
            );
        }
    }

    #[test]
    fn a_rank_that_leaves_ends_the_others_with_an_error() {
        let port = 31_761;
        let survivor = std::thread::spawn(move || {
            let mut g = ProcessGroup::join(&launch(2, 0, port), "test").unwrap();
            let mut v = vec![1.0f32; 16];
            g.all_reduce_sum(&mut v).unwrap();
            let started = Instant::now();
            let err = g.all_reduce_sum(&mut v).unwrap_err().to_string();
            (err, started.elapsed())
        });
        {
            let mut g = ProcessGroup::join(&launch(2, 1, port), "test").unwrap();
            let mut v = vec![1.0f32; 16];
            g.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, vec![2.0f32; 16]);
        } // dropped: its channels close, as when a process dies
        let (err, waited) = survivor.join().unwrap();
        assert!(err.contains("rank 1"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
    }

    #[test]
    fn a_rank_claimed_twice_or_a_world_mismatch_is_refused() {
        let port = 31_791;
        let a = std::thread::spawn(move || ProcessGroup::join(&launch(2, 0, port), "train").err());
        let b = ProcessGroup::join(&launch(3, 1, port), "train").err();
        let a = a.join().unwrap();
        let a = a.expect("rank 0 refuses").to_string();
        assert!(a.contains("--nodes 3"), "{a}");
        assert!(
            b.expect("rank 1 is refused")
                .to_string()
                .contains("--nodes")
        );
    }

    #[test]
    fn ipv6_loopback_works_too() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback on this machine: nothing to test");
            return;
        }
        let l = |rank| Launch {
            coordinator_host: "::1".into(),
            ..launch(2, rank, 31_851)
        };
        let a = std::thread::spawn(move || {
            let mut g = ProcessGroup::join(&l(0), "test").unwrap();
            let mut v = vec![1.0f32, 2.0];
            g.all_reduce_sum(&mut v).unwrap();
            v
        });
        let mut g = ProcessGroup::join(&l(1), "test").unwrap();
        let mut v = vec![10.0f32, 20.0];
        g.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![11.0, 22.0]);
        assert_eq!(a.join().unwrap(), vec![11.0, 22.0]);
    }

    #[test]
    fn a_rank_that_never_joins_times_out() {
        let mut l = launch(2, 0, 31_821);
        l.timeout = Duration::from_millis(600);
        let err = ProcessGroup::join(&l, "train").err().unwrap().to_string();
        assert!(
            err.contains("rank(s) 1") && err.contains("--peer-timeout"),
            "{err}"
        );
    }
}
