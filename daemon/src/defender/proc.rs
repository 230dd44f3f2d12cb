//! The gateway's own Device Defender device-side metrics, read from Linux `/proc`.
//!
//! [`Sampler::sample`] reads these files under its root (`/proc` in production, a fixture
//! directory in tests) and returns them as a [`Metrics`]:
//! - `net/dev`: byte and packet counters of every interface but `lo`, as [`NetworkStats`]
//!   deltas since the previous sample;
//! - `net/tcp`, `net/tcp6`: listening ports (state `0A`, LISTEN) and established connections
//!   (state `01`, ESTABLISHED);
//! - `net/udp`, `net/udp6`: bound, unconnected UDP sockets (state `07`) with a local port;
//! - `net/route`, `net/if_inet6`: which interface owns a socket's local address.
//!
//! ## Interfaces
//! `nix::ifaddrs` needs nix's `net` feature, which the workspace does not enable, so the
//! address → interface map comes from `/proc` as well (which also lets fixtures test it):
//! - wildcard (`0.0.0.0`, `::`): no interface (the socket listens on all of them);
//!   loopback (`127.0.0.0/8`, `::1`): `lo`.
//! - IPv6: `net/if_inet6` lists every address with its interface; exact match.
//! - IPv4: no `/proc` file lists IPv4 addresses by interface (`net/fib_trie` shows which
//!   addresses are local, but not where). The kernel adds a prefix route for every address
//!   it assigns, so the owner is the interface of the most specific directly connected route
//!   in `net/route` (up, no gateway, not a default route) that contains the address; ties go
//!   to the lower metric. An address without a prefix route (`noprefixroute`, a `/32` on a
//!   point-to-point link) gets no interface rather than a guess.
//!
//! ## Endianness
//! `net/tcp*` and `net/udp*` print each 32-bit word of an address (one for IPv4, four for
//! IPv6) as a hex integer read from memory in the kernel's byte order, where the address is
//! stored in network order: on x86 and ARM `0100007F:1F90` is `127.0.0.1:8080`. So each word
//! is parsed with `u32::from_str_radix` and turned back into bytes with `to_ne_bytes`: the file
//! is always written by the kernel of the machine reading it. Ports and states are plain hex
//! numbers; `net/route` prints destinations and masks like `net/tcp` addresses; `net/if_inet6`
//! prints addresses byte by byte, in network order.
//!
//! ## What must stay true
//! - Odd `/proc` content never panics: a line that does not parse is skipped, invalid UTF-8
//!   is replaced, sums saturate.
//! - Deltas are never negative: a counter smaller than before counts as restarted from 0
//!   (its delta is its new value), so does an interface that was not there before; one that
//!   went away adds nothing.
//! - The first sample after [`Sampler::new`] has no `network_stats` (there is no baseline);
//!   the baseline only moves when a sample succeeds, so a failed one loses no traffic.
//! - A missing file (no IPv6: no `net/tcp6`) reads as empty; only a missing `net/dev` is an
//!   error.

use super::report::{Connection, Connections, Metrics, NetworkStats, Port, PortList};
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// TCP state ESTABLISHED (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: u8 = 0x01;
/// TCP state LISTEN.
const TCP_LISTEN: u8 = 0x0A;
/// UDP sockets borrow TCP's states: a bound but unconnected one is TCP_CLOSE.
const UDP_UNCONNECTED: u8 = 0x07;
/// `net/route` flags (`include/uapi/linux/route.h`).
const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;

/// Reads the gateway's own metrics from `/proc`, keeping the network counters of the previous
/// sample so that [`NetworkStats`] are deltas.
#[derive(Debug)]
pub struct Sampler {
    root: PathBuf,
    /// Counters per interface (`lo` excluded) at the last successful sample.
    baseline: Option<HashMap<String, [u64; 4]>>,
}

impl Sampler {
    /// A sampler reading under `proc_root` (`/proc` in production), with no baseline yet.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            root: proc_root.into(),
            baseline: None,
        }
    }

    /// Reads the current metrics; `network_stats` is `None` on the first call and the traffic
    /// since the previous successful call afterwards.
    ///
    /// Errors: `net/dev` is missing or unreadable, or another file exists but cannot be read.
    pub fn sample(&mut self) -> io::Result<Metrics> {
        let counters: HashMap<String, [u64; 4]> = parse_net_dev(&read(&self.root.join("net/dev"))?)
            .into_iter()
            .filter(|(name, _)| name != "lo")
            .collect();
        let interfaces = Interfaces::parse(
            &self.read_optional("net/route")?,
            &self.read_optional("net/if_inet6")?,
        );
        let tcp = self.sockets("net/tcp", "net/tcp6")?;
        let udp = self.sockets("net/udp", "net/udp6")?;

        let listening = |sockets: &[Socket], state: u8| {
            let ports: BTreeSet<Port> = sockets
                .iter()
                .filter(|s| s.state == state && s.local.port() != 0)
                .map(|s| Port {
                    port: s.local.port(),
                    interface: interfaces.owner(s.local.ip()),
                })
                .collect();
            PortList {
                total: Some(ports.len() as u64),
                ports: ports.into_iter().collect(),
            }
        };
        let mut connections: Vec<Connection> = tcp
            .iter()
            .filter(|s| s.state == TCP_ESTABLISHED)
            .map(|s| Connection {
                remote_addr: s.remote,
                local_port: Some(s.local.port()),
                local_interface: interfaces.owner(s.local.ip()),
            })
            .collect();
        connections.sort();

        let metrics = Metrics {
            listening_tcp_ports: Some(listening(&tcp, TCP_LISTEN)),
            listening_udp_ports: Some(listening(&udp, UDP_UNCONNECTED)),
            network_stats: self
                .baseline
                .as_ref()
                .map(|before| delta(before, &counters)),
            established_connections: Some(Connections {
                total: Some(connections.len() as u64),
                connections,
            }),
        };
        self.baseline = Some(counters);
        Ok(metrics)
    }

    /// The file `name` under the root; empty if it does not exist.
    fn read_optional(&self, name: &str) -> io::Result<String> {
        match read(&self.root.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        }
    }

    /// The sockets of an IPv4 table and its IPv6 twin.
    fn sockets(&self, v4: &str, v6: &str) -> io::Result<Vec<Socket>> {
        let mut sockets = parse_sockets(&self.read_optional(v4)?, false);
        sockets.extend(parse_sockets(&self.read_optional(v6)?, true));
        Ok(sockets)
    }
}

/// A file as text, invalid UTF-8 replaced (its lines then fail to parse and are skipped).
fn read(path: &Path) -> io::Result<String> {
    Ok(String::from_utf8_lossy(&std::fs::read(path)?).into_owned())
}

/// The traffic from `before` to `now`, summed over the interfaces in `now`.
fn delta(before: &HashMap<String, [u64; 4]>, now: &HashMap<String, [u64; 4]>) -> NetworkStats {
    let mut sum = [0u64; 4];
    for (name, counters) in now {
        let old = before.get(name).copied().unwrap_or_default();
        for ((total, &new), &old) in sum.iter_mut().zip(counters).zip(&old) {
            // Smaller than before: the counter restarted from 0.
            *total = total.saturating_add(new.checked_sub(old).unwrap_or(new));
        }
    }
    let [bytes_in, packets_in, bytes_out, packets_out] = sum;
    NetworkStats {
        bytes_in: Some(bytes_in),
        bytes_out: Some(bytes_out),
        packets_in: Some(packets_in),
        packets_out: Some(packets_out),
    }
}

/// Parses `/proc/net/dev`: each interface's name and `[bytes_in, packets_in, bytes_out,
/// packets_out]`, in file order. The header and lines that do not parse are skipped.
pub fn parse_net_dev(text: &str) -> Vec<(String, [u64; 4])> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return None;
            }
            let fields: Vec<u64> = counters
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // 8 receive counters, then 8 transmit counters.
            if fields.len() < 16 {
                return None;
            }
            Some((
                name.to_owned(),
                [fields[0], fields[1], fields[8], fields[9]],
            ))
        })
        .collect()
}

/// One socket of `/proc/net/{tcp,tcp6,udp,udp6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    /// Local address; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is given as IPv4.
    pub local: SocketAddr,
    /// Remote address (all zeros if none), IPv4-mapped addresses given as IPv4.
    pub remote: SocketAddr,
    /// The kernel's state number (`0x0A` LISTEN, `0x01` ESTABLISHED, `0x07` CLOSE, ...).
    pub state: u8,
}

/// Parses a socket table: `/proc/net/tcp` or `udp` (`v6: false`, addresses of 8 hex digits)
/// or `tcp6` or `udp6` (`v6: true`, 32 hex digits). The header and lines that do not parse
/// are skipped.
pub fn parse_sockets(text: &str, v6: bool) -> Vec<Socket> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            // The slot number, `12:`; the header has `sl`.
            fields.next()?.strip_suffix(':')?;
            let local = parse_endpoint(fields.next()?, v6)?;
            let remote = parse_endpoint(fields.next()?, v6)?;
            let state = u8::from_str_radix(hex(fields.next()?, 2)?, 16).ok()?;
            Some(Socket {
                local,
                remote,
                state,
            })
        })
        .collect()
}

/// `ADDRESS:PORT`, both hex, the address as native-endian 32-bit words.
fn parse_endpoint(text: &str, v6: bool) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(hex(port, 4)?, 16).ok()?;
    let ip = if v6 {
        if address.len() != 32 {
            return None;
        }
        let mut octets = [0u8; 16];
        for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
            // `get`: a multi-byte character must not make the slice panic.
            chunk.copy_from_slice(&word(address.get(i * 8..i * 8 + 8)?)?);
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(word(address)?))
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// Eight hex digits printed from a native-endian `u32`, as the bytes it was read from.
fn word(text: &str) -> Option<[u8; 4]> {
    Some(u32::from_str_radix(hex(text, 8)?, 16).ok()?.to_ne_bytes())
}

/// `text` if it is exactly `digits` hex digits (`from_str_radix` alone also takes a sign).
fn hex(text: &str, digits: usize) -> Option<&str> {
    (text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit())).then_some(text)
}

/// Which interface owns a local address (see the module docs).
#[derive(Debug, Default)]
struct Interfaces {
    /// Directly connected IPv4 routes.
    routes: Vec<Route>,
    /// IPv6 addresses; the first interface listed wins (a link-local address can repeat).
    v6: HashMap<Ipv6Addr, String>,
}

/// One directly connected route of `net/route`; addresses as `u32::from(Ipv4Addr)`.
#[derive(Debug)]
struct Route {
    network: u32,
    mask: u32,
    metric: u32,
    interface: String,
}

impl Interfaces {
    /// From the text of `net/route` and `net/if_inet6`; lines that do not parse are skipped.
    fn parse(route: &str, if_inet6: &str) -> Self {
        let routes = route
            .lines()
            .filter_map(|line| {
                // Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [interface, destination, _gateway, flags, _, _, metric, mask, ..] = fields[..]
                else {
                    return None;
                };
                let flags = u16::from_str_radix(hex(flags, 4)?, 16).ok()?;
                let mask = u32::from(Ipv4Addr::from(word(mask)?));
                let connected = flags & RTF_UP != 0 && flags & RTF_GATEWAY == 0;
                // Iface `*`: an unreachable / prohibit route. Mask 0: a default route says
                // where traffic goes, not which addresses an interface owns.
                if !connected || interface == "*" || mask == 0 {
                    return None;
                }
                Some(Route {
                    network: u32::from(Ipv4Addr::from(word(destination)?)) & mask,
                    mask,
                    metric: metric.parse().ok()?,
                    interface: interface.to_owned(),
                })
            })
            .collect();
        let mut v6 = HashMap::new();
        for line in if_inet6.lines() {
            // address (network order) ifindex prefix_len scope flags name
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [address, _, _, _, _, name] = fields[..] else {
                continue;
            };
            let Some(address) = hex(address, 32).and_then(|a| u128::from_str_radix(a, 16).ok())
            else {
                continue;
            };
            v6.entry(Ipv6Addr::from(address))
                .or_insert_with(|| name.to_owned());
        }
        Self { routes, v6 }
    }

    /// The interface owning `ip`, if known; `None` for a wildcard address.
    fn owner(&self, ip: IpAddr) -> Option<String> {
        if ip.is_unspecified() {
            return None;
        }
        if ip.is_loopback() {
            return Some("lo".to_owned());
        }
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.routes
                    .iter()
                    .filter(|r| ip & r.mask == r.network)
                    .min_by_key(|r| (Reverse(r.mask.count_ones()), r.metric))
                    .map(|r| r.interface.clone())
            }
            IpAddr::V6(ip) => self.v6.get(&ip).cloned(),
        }
    }
}

/// The fixtures are what a little-endian kernel (x86-64, aarch64) writes, copied from real
/// files; only the last test reads the real `/proc`.
#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t0000010A\t00000000\t0001\t0\t0\t600\t0000FFFF\t0\t0\t0
wg0\t0002010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
ppp0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0
*\t0000A8C0\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0
";

    const IF_INET6: &str = "\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
";

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 232 1 0000000051db4859 100 0 0 10 0
   1: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16780 1 00000000f939fee6 100 0 0 10 0
   2: 020200C0:22B3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16781 1 00000000f939fee7 100 0 0 10 0
   3: 020200C0:22B3 0B02000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 16790 1 00000000f939fee8 20 4 30 10 -1
   4: 0100007F:B6A1 0100007F:B798 06 00000000:00000000 03:00000173 00000000     0        0 0 3 0000000081a71b15
   5: zzzzzzzz:22B3 0B02000A:C350 01 00000000:00000000
   6: 020200C0:22B3
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:07E8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16776 1 00000000ccd07169 100 0 0 10 0
   1: 00000000000000000000000001000000:075B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16777 1 00000000ccd0716a 100 0 0 10 0
   2: 000000FD000000000000000002000000:22B3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16778 1 00000000ccd0716b 100 0 0 10 0
   3: 000000FD000000000000000002000000:22B3 000000FD000000000000000017000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 16779 2 00000000545216e4 20 0 0 10 -1
   4: 0000000000000000FFFF0000020200C0:22B3 0000000000000000FFFF00000C02000A:C351 01 00000000:00000000 00:00000000 00000000     0        0 16782 2 00000000545216e5 20 0 0 10 -1
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  101: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 15020 2 00000000995bf1b0 0
10122: 0100007F:CD94 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 16779 2 00000000995bf1b1 0
10123: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 16780 2 00000000995bf1b2 0
";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  546: 000080FE00000000FF00FC00010000FE:0222 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 16778 2 00000000965a4d1f 0
";

    /// A `net/dev` as the kernel formats it, from `[bytes_in, packets_in, bytes_out,
    /// packets_out]` per interface.
    fn net_dev(interfaces: &[(&str, [u64; 4])]) -> String {
        let mut text = String::from(
            "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n",
        );
        for (name, [bi, pi, bo, po]) in interfaces {
            text.push_str(&format!(
                "{name:>6}: {bi:>8} {pi:>7}    0    0    0     0          0         0 {bo:>8} {po:>7}    0    0    0     0       0          0\n"
            ));
        }
        text
    }

    /// A fake `/proc` holding `files` under `net/`.
    fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("net")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join("net").join(name), text).unwrap();
        }
        dir
    }

    fn full_fixture() -> tempfile::TempDir {
        let dev = net_dev(&[
            ("lo", [3193, 29, 3193, 29]),
            ("eth0", [71363853, 3660, 200761, 1833]),
        ]);
        fixture(&[
            ("dev", &dev),
            ("route", ROUTE),
            ("if_inet6", IF_INET6),
            ("tcp", TCP),
            ("tcp6", TCP6),
            ("udp", UDP),
            ("udp6", UDP6),
        ])
    }

    fn port(port: u16, interface: Option<&str>) -> Port {
        Port {
            port,
            interface: interface.map(str::to_owned),
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn decodes_ipv4_in_host_byte_order() {
        let sockets = parse_sockets(TCP, false);
        assert_eq!(sockets.len(), 5, "header and two broken lines skipped");
        assert_eq!(sockets[1].local, addr("127.0.0.1:1883"));
        assert_eq!(
            sockets[3],
            Socket {
                local: addr("192.0.2.2:8883"),
                remote: addr("10.0.2.11:50000"),
                state: TCP_ESTABLISHED,
            }
        );
        let line = "0: 0100007F:1F90 00000000:0000 0A 00000000:00000000";
        assert_eq!(parse_sockets(line, false)[0].local, addr("127.0.0.1:8080"));
    }

    #[test]
    fn decodes_ipv6_words_and_mapped_addresses_as_ipv4() {
        let sockets = parse_sockets(TCP6, true);
        assert_eq!(sockets.len(), 5);
        assert_eq!(sockets[0].local, addr("[::]:2024"));
        assert_eq!(sockets[1].local, addr("[::1]:1883"));
        assert_eq!(sockets[3].local, addr("[fd00::2]:8883"));
        assert_eq!(sockets[3].remote, addr("[fd00::17]:54321"));
        assert_eq!(sockets[4].local, addr("192.0.2.2:8883"));
        assert_eq!(sockets[4].remote, addr("10.0.2.12:50001"));
        let udp6 = parse_sockets(UDP6, true);
        assert_eq!(udp6[0].local, addr("[fe80::fc:ff:fe00:1]:546"));
        // A v4 table read as v6 (and the reverse) has addresses of the wrong length.
        assert!(parse_sockets(TCP, true).is_empty());
        assert!(parse_sockets(TCP6, false).is_empty());
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let sockets = "\
garbage
0: +100007F:1F90 00000000:0000 0A
1: 0100007F:1F90 00000000:0000 0A0
2: 0100007F 00000000:0000 0A
3: 0100007F:1F90 00000000:0000
0100007F:1F90 00000000:0000 0A
4: 0100007F:-F90 00000000:0000 0A
5: 0100007F:1F90 00000000:0000 0A
";
        assert_eq!(parse_sockets(sockets, false).len(), 1);
        // 32 bytes, with a two-byte character across the first word's end.
        let v6 = format!(
            "0: 0000000é{}:1F90 {}:0000 0A",
            "0".repeat(23),
            "0".repeat(32)
        );
        assert!(parse_sockets(&v6, true).is_empty());

        let dev = format!(
            "{}  eth1: 1 2 3\n  eth2: a b c d e f g h i j k l m n o p\n    : {}\nnot a line\n  eth3: {}\n",
            net_dev(&[("eth0", [1, 2, 3, 4])]),
            "1 ".repeat(16),
            "18446744073709551616 ".repeat(16),
        );
        assert_eq!(parse_net_dev(&dev), vec![("eth0".to_owned(), [1, 2, 3, 4])]);

        let interfaces = Interfaces::parse(
            "eth0\tzz\n\t\t\nwlan0\t0000010A\t00000000\t01\t0\t0\t0\t0000FFFF",
            "fd00 1 2\n",
        );
        assert!(interfaces.routes.is_empty() && interfaces.v6.is_empty());

        // Invalid UTF-8 in a table: its line is skipped, the sample succeeds.
        let dir = fixture(&[("dev", &net_dev(&[]))]);
        let mut tcp = TCP.as_bytes().to_vec();
        tcp.extend_from_slice(b"   7: \xff\xfe:22B3 00000000:0000 0A\n");
        std::fs::write(dir.path().join("net/tcp"), tcp).unwrap();
        let metrics = Sampler::new(dir.path()).sample().unwrap();
        assert_eq!(metrics.listening_tcp_ports.unwrap().total, Some(3));
    }

    #[test]
    fn interfaces_are_mapped_from_routes_and_if_inet6() {
        let interfaces = Interfaces::parse(ROUTE, IF_INET6);
        let owner = |ip: &str| interfaces.owner(ip.parse().unwrap());
        assert_eq!(owner("0.0.0.0"), None);
        assert_eq!(owner("::"), None);
        assert_eq!(owner("127.0.0.1").as_deref(), Some("lo"));
        assert_eq!(owner("127.0.1.1").as_deref(), Some("lo"));
        assert_eq!(owner("::1").as_deref(), Some("lo"));
        assert_eq!(owner("192.0.2.2").as_deref(), Some("eth0"));
        assert_eq!(owner("fd00::2").as_deref(), Some("eth0"));
        assert_eq!(owner("fe80::fc:ff:fe00:1").as_deref(), Some("eth0"));
        // Longest prefix wins: 10.1.0.0/16 is wlan0, 10.1.2.0/24 is wg0.
        assert_eq!(owner("10.1.7.7").as_deref(), Some("wlan0"));
        assert_eq!(owner("10.1.2.5").as_deref(), Some("wg0"));
        // Only default routes (via eth0's gateway, or ppp0's) or an unreachable route cover it.
        assert_eq!(owner("198.51.100.1"), None);
        assert_eq!(owner("192.168.0.1"), None);
        assert_eq!(owner("fd00::99"), None);
    }

    #[test]
    fn sample_filters_states_maps_interfaces_and_deduplicates() {
        let dir = full_fixture();
        let metrics = Sampler::new(dir.path()).sample().unwrap();
        assert_eq!(
            metrics.listening_tcp_ports,
            Some(PortList {
                ports: vec![
                    port(1883, Some("lo")),
                    port(2024, None),
                    port(8883, Some("eth0"))
                ],
                total: Some(3),
            })
        );
        assert_eq!(
            metrics.listening_udp_ports,
            Some(PortList {
                ports: vec![port(68, None), port(546, Some("eth0"))],
                total: Some(2),
            })
        );
        let connection = |remote: &str| Connection {
            remote_addr: addr(remote),
            local_port: Some(8883),
            local_interface: Some("eth0".to_owned()),
        };
        assert_eq!(
            metrics.established_connections,
            Some(Connections {
                connections: vec![
                    connection("10.0.2.11:50000"),
                    connection("10.0.2.12:50001"),
                    connection("[fd00::17]:54321"),
                ],
                total: Some(3),
            })
        );
    }

    #[test]
    fn network_stats_are_deltas_without_lo_and_none_at_first() {
        let dir = full_fixture();
        let mut sampler = Sampler::new(dir.path());
        assert_eq!(sampler.sample().unwrap().network_stats, None);
        let dev = net_dev(&[
            ("lo", [9000, 90, 9000, 90]),
            ("eth0", [71364853, 3670, 201261, 1838]),
        ]);
        std::fs::write(dir.path().join("net/dev"), dev).unwrap();
        assert_eq!(
            sampler.sample().unwrap().network_stats,
            Some(NetworkStats {
                bytes_in: Some(1000),
                bytes_out: Some(500),
                packets_in: Some(10),
                packets_out: Some(5),
            })
        );
        // Nothing moved.
        let stats = sampler.sample().unwrap().network_stats.unwrap();
        assert_eq!(stats.bytes_in, Some(0));
        assert_eq!(stats.packets_out, Some(0));
    }

    #[test]
    fn counters_that_go_back_count_as_restarted() {
        let dir = fixture(&[(
            "dev",
            &net_dev(&[
                ("eth0", [5000, 50, 6000, 60]),
                ("wlan0", [1000, 10, 2000, 20]),
            ]),
        )]);
        let mut sampler = Sampler::new(dir.path());
        assert_eq!(sampler.sample().unwrap().network_stats, None);
        // wlan0 was reset, usb0 appeared.
        let dev = net_dev(&[
            ("eth0", [5100, 51, 6200, 62]),
            ("wlan0", [300, 3, 400, 4]),
            ("usb0", [7, 1, 8, 1]),
        ]);
        std::fs::write(dir.path().join("net/dev"), dev).unwrap();
        assert_eq!(
            sampler.sample().unwrap().network_stats,
            Some(NetworkStats {
                bytes_in: Some(100 + 300 + 7),
                bytes_out: Some(200 + 400 + 8),
                packets_in: Some(1 + 3 + 1),
                packets_out: Some(2 + 4 + 1),
            })
        );
        // wlan0 and usb0 went away.
        std::fs::write(
            dir.path().join("net/dev"),
            net_dev(&[("eth0", [5150, 52, 6200, 62])]),
        )
        .unwrap();
        let stats = sampler.sample().unwrap().network_stats.unwrap();
        assert_eq!(
            (stats.bytes_in, stats.packets_in, stats.bytes_out),
            (Some(50), Some(1), Some(0))
        );
    }

    #[test]
    fn missing_tables_are_empty_but_net_dev_is_required() {
        let dir = fixture(&[("dev", &net_dev(&[("eth0", [1, 1, 1, 1])])), ("tcp", TCP)]);
        let metrics = Sampler::new(dir.path()).sample().unwrap();
        // No route table either: the eth0 address has no known interface.
        assert_eq!(
            metrics.listening_tcp_ports.unwrap().ports,
            vec![port(1883, Some("lo")), port(2024, None), port(8883, None)]
        );
        assert_eq!(
            metrics.listening_udp_ports,
            Some(PortList {
                ports: vec![],
                total: Some(0)
            })
        );
        assert_eq!(metrics.established_connections.unwrap().total, Some(1));

        let empty = fixture(&[]);
        let error = Sampler::new(empty.path()).sample().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn real_proc_shows_own_listener_and_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = TcpStream::connect(server).unwrap();
        let mut sampler = Sampler::new("/proc");
        assert_eq!(sampler.sample().unwrap().network_stats, None);
        let metrics = sampler.sample().unwrap();

        let stats = metrics.network_stats.expect("second sample has a baseline");
        assert!(stats.bytes_in.is_some() && stats.packets_out.is_some());
        let tcp = metrics.listening_tcp_ports.unwrap();
        assert!(
            tcp.ports.contains(&port(server.port(), Some("lo"))),
            "{tcp:?}"
        );
        assert_eq!(tcp.total, Some(tcp.ports.len() as u64));
        let connections = metrics.established_connections.unwrap().connections;
        let ours = Connection {
            remote_addr: server,
            local_port: Some(client.local_addr().unwrap().port()),
            local_interface: Some("lo".to_owned()),
        };
        assert!(connections.contains(&ours), "{connections:?}");
    }
}
