//! Giving back what only the start needed: once the gateway is ready and has been quiet for a
//! while (no message for 10 s, so never under load: paging code back in would delay readings;
//! a gateway busy from its first second keeps the pages), the heap's free memory
//! goes back to the kernel (`malloc_trim`) and the executable's pages that start-up touched are
//! released from the resident set (`madvise(MADV_PAGEOUT)` on the binary's own mappings).
//!
//! Why: start-up runs code that never runs again — the configuration stack (figment, TOML,
//! clap), TLS and certificate loading, sled's recovery, the plugins' deserialisation,
//! rumqttd's set-up. The kernel maps code in 64 KiB fault-around blocks, so that one-off code
//! keeps about 8 MiB of the binary resident in an idle gateway although a fraction of it runs.
//! Those pages are clean and file-backed: releasing them loses nothing, and the pages the
//! running gateway does use come back on their next use (from the page cache, or one read of
//! the binary). What stays resident afterwards is the code the gateway really runs.
//!
//! Tried and not kept: fixing glibc's mmap threshold at 128 KiB (or 1 MiB) at start, so that
//! freed large blocks leave the resident set at once, lowered the paced spine run's peak RSS
//! by 4–5 MiB but raised its p99 from 15 ms to 94–175 ms in three of four runs (every large
//! allocation a fresh mapping: page faults and unmaps under load).
//!
//! At READY, before any device is served, the executable's *code* pages alone are dropped
//! from the resident set with `MADV_DONTNEED` ([`drop_code_pages`]): unlike `MADV_PAGEOUT`
//! this leaves them in the page cache, so code that runs again comes back through minor
//! faults (no disk read) and the first readings do not wait for the disk; start-up's one-off
//! code — the plugin compiler among it — then stays out of the resident set under load. (The
//! `MADV_PAGEOUT` release at READY, tried first, cost the paced spine run's p99 17–59 ms
//! instead of 15 ms: those pages came back from the disk.)
//!
//! Also here, for the same budget: the limit on glibc's malloc arenas, set first thing in
//! `wardgate run` ([`limit_malloc_arenas`]), and the heap trim ([`trim_heap`]) that the READY
//! release, the quiet release and the login pool's idle release share.
//!
//! What must stay true: this is advice to the kernel and never fails the gateway (an older
//! kernel without `MADV_PAGEOUT` says EINVAL, which is logged at debug and ignored); only
//! clean, file-backed, read-only or executable mappings of the gateway's own executable are
//! touched — never anonymous memory, never a writable mapping, never another file; and
//! `MADV_DONTNEED`, which discards, only ever on executable ones and on read-only ones that
//! hold no page of their own (no anonymous or swapped page: not RELRO).

use std::ops::Range;

/// The executable's code mappings (private, executable, never writable) in `maps`, for the
/// file `exe`: the only mappings [`drop_code_pages`] touches.
pub fn code_ranges(maps: &str, exe: &str) -> Vec<Range<usize>> {
    mappings(maps, exe, true)
}

/// Drop the executable's code pages from the resident set at once (`MADV_DONTNEED` on its
/// private executable mappings), without evicting them from the page cache: the code the
/// running gateway uses comes back through minor faults (a page-table update, no disk read),
/// so this is cheap enough to do when the gateway turns ready, before any device is served.
/// Start-up's one-off code (the configuration stack, TLS loading, sled's recovery, the plugin
/// compiler) then never counts in the resident set under load. Returns the bytes advised.
///
/// Only code: a read-only *data* mapping may hold pages the dynamic loader wrote before making
/// them read-only (RELRO), and `MADV_DONTNEED` would replace those with the file's unrelocated
/// bytes. Code is never written, so its pages are always the file's.
pub fn drop_code_pages() -> u64 {
    advise_own_mappings(true, nix::libc::MADV_DONTNEED, "MADV_DONTNEED")
}

/// Give `advice` to the executable's own private, unwritable mappings (with `code_only`, its
/// executable ones alone) as `/proc/self/maps` lists them now; the bytes advised. Stops at the
/// first refusal; every failure is logged at debug and leaves the pages resident.
fn advise_own_mappings(code_only: bool, advice: nix::libc::c_int, name: &str) -> u64 {
    let exe = match std::fs::read_link("/proc/self/exe") {
        Ok(p) => p,
        Err(e) => {
            log::debug!(error:% = e; "memory: cannot find the executable; its pages stay resident");
            return 0;
        }
    };
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(m) => m,
        Err(e) => {
            log::debug!(error:% = e; "memory: cannot read /proc/self/maps; the executable's pages stay resident");
            return 0;
        }
    };
    let mut bytes = 0;
    for r in mappings(&maps, &exe.to_string_lossy(), code_only) {
        let len = (r.end - r.start) as u64;
        match advise(r, advice) {
            Ok(()) => bytes += len,
            Err(e) => {
                log::debug!(error:% = e, advice = name; "memory: madvise({name}) refused; the executable's pages stay resident");
                break;
            }
        }
    }
    bytes
}

/// What [`release_at_ready`] gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AtReady {
    /// Bytes of the executable's code mappings advised out.
    pub code_bytes: u64,
    /// Bytes of its read-only data mappings advised out (only those holding no page of their
    /// own, see [`unwritten_data_ranges`]).
    pub data_bytes: u64,
    /// Whether `malloc_trim` released heap memory.
    pub heap_trimmed: bool,
}

/// What goes at READY, before any device is served: the executable's code pages
/// ([`drop_code_pages`]); its read-only data pages the same way, for the mappings that hold
/// nothing but the file's pages (start-up reads the configuration stack's and the plugin
/// compiler's tables, ~2 MiB resident in 64 KiB fault-around blocks, of which a running
/// gateway reads a few hundred KiB); and the heap's free pages (`malloc_trim`: what start-up
/// allocated and freed — TOML, certificates, sled's recovery, the plugin compiler's working
/// memory — would otherwise stay resident in the allocator's arenas and count in every later
/// peak). All three are cheap (milliseconds) and safe before the first device.
pub fn release_at_ready() -> AtReady {
    let code_bytes = drop_code_pages();
    let data_bytes = match (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/smaps"),
    ) {
        (Ok(exe), Ok(smaps)) => {
            let mut bytes = 0;
            for r in unwritten_data_ranges(&smaps, &exe.to_string_lossy()) {
                let len = (r.end - r.start) as u64;
                match advise(r, nix::libc::MADV_DONTNEED) {
                    Ok(()) => bytes += len,
                    Err(e) => {
                        log::debug!(error:% = e; "memory: madvise(MADV_DONTNEED) refused; the executable's data pages stay resident");
                        break;
                    }
                }
            }
            bytes
        }
        _ => 0,
    };
    AtReady {
        code_bytes,
        data_bytes,
        heap_trimmed: trim_heap(),
    }
}

/// The executable's read-only, non-executable private mappings in `smaps` (the text of
/// `/proc/self/smaps`) for the file `exe` that hold no anonymous or swapped page: every page
/// they have is the file's own, so `MADV_DONTNEED` loses nothing and the next read maps the
/// file's same bytes again. A mapping the dynamic loader relocated before making it read-only
/// (RELRO) holds anonymous pages and is never chosen; nothing writes a read-only mapping
/// afterwards (a write faults), so the check cannot go stale.
pub fn unwritten_data_ranges(smaps: &str, exe: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    // (range, still a candidate) of the mapping whose fields are being read.
    let mut current: Option<(Range<usize>, bool)> = None;
    fn finish(c: Option<(Range<usize>, bool)>, out: &mut Vec<Range<usize>>) {
        if let Some((r, true)) = c {
            out.push(r);
        }
    }
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some(name) = first.strip_suffix(':') {
            // A field of the current mapping: `Anonymous:  0 kB`.
            if let Some((_, keep)) = &mut current {
                if (name == "Anonymous" || name == "Swap") && fields.next() != Some("0") {
                    *keep = false;
                }
            }
            continue;
        }
        // A mapping's header: start-end perms offset dev inode path.
        finish(current.take(), &mut out);
        let Some(perms) = fields.next() else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        let p = perms.as_bytes();
        if path != exe
            || p.len() < 4
            || p[0] != b'r'
            || p[1] == b'w'
            || p[2] == b'x'
            || p[3] != b'p'
        {
            continue;
        }
        let Some((a, b)) = first.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
            if a < b {
                current = Some((a..b, true));
            }
        }
    }
    finish(current.take(), &mut out);
    out
}

/// Give the heap's free pages back to the kernel (`malloc_trim(0)`: every arena, and free
/// pages inside them, not only their tops); whether anything was released. Takes a few
/// milliseconds, holding each arena's lock in turn: for moments without load.
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim only walks glibc's own arenas; any thread may call it.
    #[allow(unsafe_code)]
    let released = unsafe { nix::libc::malloc_trim(0) } == 1;
    released
}

/// glibc malloc arenas the gateway uses (`M_ARENA_MAX`): one per core, for the threads that
/// handle readings (tokio's workers), and one for the main thread, unless the environment sets
/// a number (`MALLOC_ARENA_MAX`, or `arena_max` in `GLIBC_TUNABLES`).
///
/// Why: glibc gives threads that meet on a locked arena arenas of their own, up to eight per
/// core, and each arena keeps the memory its threads freed for their next allocations. The
/// gateway's threads — tokio's workers and blocking threads, sled's IO threads and flushers,
/// the broker, the argon2 pool, the plugin compiler's — spread its heap over seven arenas in
/// the paced `spine` run (2 cores), and the free memory held in them was a quarter of its
/// peak RSS: 44.4 MiB with glibc's default, 39.3 MiB with two arenas, 38.3 MiB with one, p99
/// the same within the machine's noise (16–22 ms). With the other reductions of the same round
/// in place, three arenas (this default on 2 cores) 33.2–36.7 MiB, two 32.6–34.5 MiB: the
/// arena a core's worker does not share with the other's is worth about 1 MiB; with fewer, the
/// workers would likely share one and wait for each other's allocations (the flat-out rate
/// was not measured with two).
pub fn malloc_arenas() -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(1024));
    cores as i32 + 1
}

/// Set [`malloc_arenas`] (see there); call first thing, before any thread starts. Whether it
/// was set (not when the environment chose, or glibc refused).
pub fn limit_malloc_arenas() -> bool {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if chosen {
        return false;
    }
    // SAFETY: mallopt changes a parameter of glibc's allocator; M_ARENA_MAX only bounds how
    // many arenas later allocations may create.
    #[allow(unsafe_code)]
    let set = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, malloc_arenas()) } == 1;
    set
}

/// What [`release_startup_memory`] gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Bytes of the executable's mappings advised out.
    pub code_bytes: u64,
    /// Whether `malloc_trim` released heap memory.
    pub heap_trimmed: bool,
}

/// The executable's read-only and executable mappings in `maps` (the text of
/// `/proc/self/maps`) for the file `exe`.
pub fn executable_ranges(maps: &str, exe: &str) -> Vec<Range<usize>> {
    mappings(maps, exe, false)
}

/// The private, unwritable mappings of `exe` in `maps`; with `code_only`, only executable ones.
fn mappings(maps: &str, exe: &str, code_only: bool) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        if path != exe || perms.len() < 4 || perms.as_bytes()[1] == b'w' {
            continue;
        }
        // Private and not writable: the pages are the file's own, clean.
        if perms.as_bytes()[3] != b'p' || (code_only && perms.as_bytes()[2] != b'x') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if a < b {
            out.push(a..b);
        }
    }
    out
}

/// Return start-up memory to the kernel (see the module docs). Call once the gateway is
/// ready; cheap (a few milliseconds) and safe to call again.
pub fn release_startup_memory() -> Released {
    Released {
        heap_trimmed: trim_heap(),
        code_bytes: advise_own_mappings(false, nix::libc::MADV_PAGEOUT, "MADV_PAGEOUT"),
    }
}

/// `madvise(range, advice)`. Callers pass only whole mappings of this process chosen by
/// [`mappings`], with an advice that is safe for them (see each caller).
fn advise(range: Range<usize>, advice: nix::libc::c_int) -> std::io::Result<()> {
    // SAFETY: MADV_PAGEOUT is advice: it changes no content and no mapping; the range is a
    // whole mapping of this process that is not writable, so no data can be lost.
    // MADV_DONTNEED is only given code mappings (private, executable, never writable) and
    // read-only data mappings that hold no anonymous or swapped page (`unwritten_data_ranges`):
    // their pages are the file's, never written, so dropping them loses nothing and the next
    // access maps the file's same bytes again.
    #[allow(unsafe_code)]
    let rc = unsafe {
        nix::libc::madvise(
            range.start as *mut nix::libc::c_void,
            range.end - range.start,
            advice,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0400000 r--p 00000000 fe:01 123 /usr/bin/wardgate
55d0c0400000-55d0c1600000 r-xp 00400000 fe:01 123 /usr/bin/wardgate
55d0c1600000-55d0c1a00000 r--p 01600000 fe:01 123 /usr/bin/wardgate
55d0c1a00000-55d0c1b00000 rw-p 01a00000 fe:01 123 /usr/bin/wardgate
55d0c1b00000-55d0c1c00000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000200000 r-xp 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 r-xs 00000000 fe:01 123 /usr/bin/wardgate
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
";

    #[test]
    fn only_the_executables_private_unwritable_mappings_are_chosen() {
        let r = executable_ranges(MAPS, "/usr/bin/wardgate");
        assert_eq!(
            r,
            vec![
                0x55d0c0000000..0x55d0c0400000,
                0x55d0c0400000..0x55d0c1600000,
                0x55d0c1600000..0x55d0c1a00000,
            ]
        );
        assert!(executable_ranges(MAPS, "/usr/bin/other").is_empty());
    }

    /// smaps of an executable whose RELRO mapping holds relocated (anonymous) pages.
    const SMAPS: &str = "\
55d0c0000000-55d0c0400000 r--p 00000000 fe:01 123 /usr/bin/wardgate
Size:               4096 kB
Rss:                2048 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0c0400000-55d0c1600000 r-xp 00400000 fe:01 123 /usr/bin/wardgate
Size:              18432 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0c1600000-55d0c1700000 r--p 01600000 fe:01 123 /usr/bin/wardgate
Size:               1024 kB
Anonymous:           672 kB
Swap:                  0 kB
55d0c1700000-55d0c1800000 r--p 01700000 fe:01 123 /usr/bin/wardgate
Size:               1024 kB
Anonymous:             0 kB
Swap:                  8 kB
55d0c1800000-55d0c1900000 r--p 01800000 fe:01 123 /usr/bin/wardgate
Size:               1024 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0c1a00000-55d0c1b00000 rw-p 01a00000 fe:01 123 /usr/bin/wardgate
Anonymous:             0 kB
7f0000000000-7f0000200000 r--p 00000000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 r--s 00000000 fe:01 123 /usr/bin/wardgate
Anonymous:             0 kB
";

    #[test]
    fn only_unwritten_read_only_data_of_the_executable_is_dropped_at_ready() {
        assert_eq!(
            unwritten_data_ranges(SMAPS, "/usr/bin/wardgate"),
            vec![
                0x55d0c0000000..0x55d0c0400000,
                // The last mapping: its fields end the text.
                0x55d0c1800000..0x55d0c1900000,
            ],
            "not code, not RELRO (anonymous pages), not swapped, not writable, not shared"
        );
        assert!(unwritten_data_ranges(SMAPS, "/usr/bin/other").is_empty());
    }

    /// The test binary's own read-only data, dropped, reads back the same.
    #[test]
    fn dropped_data_pages_read_back_the_same() {
        static TABLE: [u64; 4096] = {
            let mut t = [0u64; 4096];
            let mut i = 0;
            while i < t.len() {
                t[i] = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                i += 1;
            }
            t
        };
        let sum = || {
            std::hint::black_box(&TABLE)
                .iter()
                .fold(0u64, |a, &v| a ^ v.rotate_left(7))
        };
        let before = sum();
        let r = release_at_ready();
        assert!(r.code_bytes > 0);
        assert!(
            r.data_bytes > 0,
            "the test binary has read-only data of the file's own"
        );
        assert_eq!(sum(), before);
    }

    #[test]
    fn only_code_mappings_are_dropped_at_ready() {
        assert_eq!(
            code_ranges(MAPS, "/usr/bin/wardgate"),
            vec![0x55d0c0400000..0x55d0c1600000]
        );
    }

    /// The test binary's own code, dropped from the resident set, runs on: the pages come
    /// back from the file as the code runs.
    #[test]
    fn dropped_code_pages_come_back_when_the_code_runs() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let code = code_ranges(
            &std::fs::read_to_string("/proc/self/maps").unwrap(),
            &exe.to_string_lossy(),
        );
        let resident = || code.iter().map(|r| resident_kib(r.start)).sum::<u64>();
        let before = resident();
        let dropped = drop_code_pages();
        // Read back at once: only the code that ran since (this test, the smaps reader) is in.
        let after = resident();
        assert!(dropped > 0, "the test binary has code mappings");
        assert!(
            after < before,
            "{before} KiB of code resident before, {after} KiB after"
        );
        // Code all over the binary runs again after the drop.
        let r = executable_ranges(
            &std::fs::read_to_string("/proc/self/maps").unwrap(),
            &std::fs::read_link("/proc/self/exe")
                .unwrap()
                .to_string_lossy(),
        );
        assert!(!r.is_empty());
        let v: serde_json::Value = serde_json::from_str(r#"{"a":[1,2,{"b":null}]}"#).unwrap();
        assert_eq!(v["a"][2]["b"], serde_json::Value::Null);
        assert_eq!(drop_code_pages(), dropped, "the same mappings, still there");
    }

    /// Resident KiB of the mapping that starts at `start` (`/proc/self/smaps`).
    fn resident_kib(start: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{start:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        assert!(lines.next().is_some(), "mapping {head} not in smaps");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("Rss of the mapping")
    }

    /// The advice on a file only this process maps (the test binary itself is mapped by the
    /// other tests running beside this one, and shared pages stay): its pages go, and it
    /// still reads the same afterwards.
    #[test]
    fn paged_out_file_pages_leave_the_resident_set_and_read_back_the_same() {
        use std::io::Write;
        const LEN: usize = 4 << 20;
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).unwrap();
        f.sync_all().unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only private mapping of a file this test owns, unmapped below.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                LEN,
                nix::libc::PROT_READ,
                nix::libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, nix::libc::MAP_FAILED);
        // SAFETY: the mapping is LEN readable bytes and lives until munmap below.
        #[allow(unsafe_code)]
        let view = unsafe { std::slice::from_raw_parts(ptr as *const u8, LEN) };
        let sum = |v: &[u8]| v.iter().map(|&b| b as u64).sum::<u64>();
        let expected = sum(&content);
        assert_eq!(sum(view), expected);
        let start = ptr as usize;
        let before = resident_kib(start);
        assert!(
            before >= 3 << 10,
            "{before} KiB resident after reading 4 MiB"
        );
        match advise(start..start + LEN, nix::libc::MADV_PAGEOUT) {
            Ok(()) => {
                let after = resident_kib(start);
                assert!(
                    after < before / 4,
                    "{before} KiB resident before, {after} after"
                );
            }
            // A kernel without MADV_PAGEOUT (before 5.4).
            Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL), "{e}"),
        }
        assert_eq!(sum(view), expected, "the pages read back the same");
        // SAFETY: unmapping the mapping made above; `view` is not used after this.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::munmap(ptr, LEN);
        }
    }

    #[test]
    fn releasing_the_gateways_own_pages_never_fails_it() {
        // Whatever the kernel keeps (other processes map this test binary too), the call
        // returns and the process keeps running; a second call is as good as the first.
        let first = release_startup_memory();
        let second = release_startup_memory();
        assert_eq!(first.code_bytes, second.code_bytes);
    }
}
