//! Fuzz smoke run (CI): each target of `tests/fuzz/targets.rs` replays its seed corpus
//! (`target/fuzz/corpus/NAME`, written by `scripts/fuzz-corpus.sh`) and then runs structure-aware
//! mutations of it for `FASTKV_FUZZ_SECONDS` (default 10) per target. A panic, an execution longer
//! than 10 s, or an allocation that would take the live heap past 4 GiB saves the input to
//! `target/fuzz/crashes/NAME-HASH` and fails. `FASTKV_FUZZ_TARGET` runs one target,
//! `FASTKV_FUZZ_SEED` replaces the fixed mutation seed (printed). Long coverage-guided runs:
//! `scripts/fuzz.sh`.

mod common;
#[path = "fuzz/targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

const DEFAULT_SEED: u64 = 17;
const MAX_LIVE_BYTES: usize = 4 << 30;
const MAX_EXEC: Duration = Duration::from_secs(10);
/// Mutants grow no larger than this.
const MAX_INPUT: usize = 4 << 20;

/// How an input is built, so mutations keep it well-formed often enough to get past the parsers.
enum Shape {
    Bytes,
    Json,
    /// u64 header length, JSON header, data.
    Safetensors,
    /// [`targets::sections`], each of its own shape.
    Sections(&'static [Shape]),
}

struct Target {
    name: &'static str,
    run: fn(&[u8]),
    shape: Shape,
}

const TARGETS: [Target; 5] = [
    Target { name: "gguf", run: targets::gguf, shape: Shape::Bytes },
    Target { name: "hf_config", run: targets::hf_config, shape: Shape::Json },
    Target { name: "safetensors", run: targets::safetensors, shape: Shape::Safetensors },
    Target { name: "engine", run: targets::engine, shape: Shape::Sections(&[Shape::Json, Shape::Json, Shape::Json]) },
    Target {
        name: "tokenizer",
        run: targets::tokenizer,
        shape: Shape::Sections(&[Shape::Json, Shape::Bytes, Shape::Bytes]),
    },
];

#[test]
fn fuzz_targets_survive_mutated_seed_corpora() {
    let only = std::env::var("FASTKV_FUZZ_TARGET").ok();
    if let Some(name) = &only {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        assert!(names.contains(&name.as_str()), "FASTKV_FUZZ_TARGET={name}: the targets are {names:?}");
    }
    let seconds: f64 = std::env::var("FASTKV_FUZZ_SECONDS").map_or(10.0, |s| s.parse().expect("FASTKV_FUZZ_SECONDS"));
    let seed: u64 = std::env::var("FASTKV_FUZZ_SEED").map_or(DEFAULT_SEED, |s| s.parse().expect("FASTKV_FUZZ_SEED"));
    println!("mutation seed {seed} (FASTKV_FUZZ_SEED)");
    std::thread::spawn(watchdog);
    for (i, Target { name, run, shape }) in TARGETS.iter().enumerate() {
        if only.as_ref().is_some_and(|o| o != name) {
            continue;
        }
        let Some(dir) = common::resource(fuzz_dir().join("corpus").join(name), "scripts/fuzz-corpus.sh") else {
            continue;
        };
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("corpus entry").path()).collect();
        paths.sort();
        let corpus: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).expect("corpus file")).collect();
        assert!(!corpus.is_empty(), "{}: empty corpus", dir.display());
        corpus.iter().for_each(|input| exec(name, *run, input));
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        let start = Instant::now();
        let mut runs = 0;
        while start.elapsed().as_secs_f64() < seconds {
            let mut input = corpus[rng.random_range(0..corpus.len())].clone();
            for _ in 0..rng.random_range(1..=4) {
                let other = &corpus[rng.random_range(0..corpus.len())];
                input = mutate(&mut rng, shape, &input, other);
                input.truncate(MAX_INPUT);
            }
            exec(name, *run, &input);
            runs += 1;
        }
        println!("{name}: {} seeds, {runs} mutants in {:.1} s", corpus.len(), start.elapsed().as_secs_f64());
    }
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz")
}

/// The input being executed, for the allocation cap and the watchdog to save.
static CURRENT: Mutex<(&str, Vec<u8>)> = Mutex::new(("", Vec::new()));
/// When the current execution started, in ms since [`epoch`] plus one; 0 between executions.
static STARTED: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn exec(name: &'static str, run: fn(&[u8]), input: &[u8]) {
    let copy = input.to_vec();
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = (name, copy);
    STARTED.store(epoch().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
    let outcome = catch_unwind(AssertUnwindSafe(|| run(input)));
    STARTED.store(0, Ordering::SeqCst);
    if outcome.is_err() {
        panic!("{name} panicked (message above); input saved to {}", save(name, input).display());
    }
}

/// Writes a failing input to `target/fuzz/crashes/NAME-HASH`.
fn save(name: &str, input: &[u8]) -> PathBuf {
    let dir = fuzz_dir().join("crashes");
    std::fs::create_dir_all(&dir).expect("crashes dir");
    let hash = Sha256::digest(input);
    let path = dir.join(format!("{name}-{}", hash[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()));
    std::fs::write(&path, input).expect("crashes dir is writable");
    path
}

/// Saves the current input and aborts: for failures that cannot unwind (a hung execution, an
/// allocation the process must not make). Written straight to stderr: the test harness's capture
/// would be lost with the process.
fn abort_with(what: &str) -> ! {
    let (name, input) = &*CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    let path = save(name, input);
    let _ = writeln!(std::io::stderr(), "fuzz target {name}: {what}; input saved to {}", path.display());
    std::process::abort()
}

fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let started = STARTED.load(Ordering::SeqCst);
        if started != 0 && epoch().elapsed().as_millis() as u64 + 1 - started > MAX_EXEC.as_millis() as u64 {
            abort_with(&format!("an execution ran longer than {} s", MAX_EXEC.as_secs()));
        }
    }
}

/// The system allocator, refusing to let the live heap pass [`MAX_LIVE_BYTES`]: such an
/// allocation is a bug the fuzz run reports (and would take the machine's memory otherwise).
struct CappedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static OVER_CAP: AtomicBool = AtomicBool::new(false);

fn reserve(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    // The first one over aborts; allocations made while saving the input go through.
    if live > MAX_LIVE_BYTES && !OVER_CAP.swap(true, Ordering::SeqCst) {
        abort_with(&format!("an allocation of {bytes} bytes would take the live heap past 4 GiB"));
    }
}

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        reserve(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match new_size.checked_sub(layout.size()) {
            Some(grow) => reserve(grow),
            None => {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn mutate(rng: &mut StdRng, shape: &Shape, input: &[u8], other: &[u8]) -> Vec<u8> {
    match shape {
        Shape::Bytes => mutate_bytes(rng, input, other),
        Shape::Json => match serde_json::from_slice::<Value>(input) {
            Ok(mut v) if rng.random_bool(0.8) => {
                mutate_json(rng, &mut v);
                serde_json::to_vec(&v).expect("a JSON value serializes")
            }
            _ => mutate_bytes(rng, input, other),
        },
        Shape::Safetensors => {
            let Some(n) = input.get(..8).map(|n| u64::from_le_bytes(n.try_into().unwrap()) as usize) else {
                return mutate_bytes(rng, input, other);
            };
            if n > input.len() - 8 || rng.random_bool(0.3) {
                return mutate_bytes(rng, input, other);
            }
            let header = mutate(rng, &Shape::Json, &input[8..8 + n], &other[other.len().min(8)..]);
            [&(header.len() as u64).to_le_bytes()[..], &header, &input[8 + n..]].concat()
        }
        Shape::Sections(shapes) => {
            let (mut parts, others) = (targets::sections(input, shapes.len()), targets::sections(other, shapes.len()));
            let i = rng.random_range(0..shapes.len());
            let part =
                if rng.random_bool(0.1) { others[i].to_vec() } else { mutate(rng, &shapes[i], parts[i], others[i]) };
            parts[i] = &part;
            targets::pack(&parts)
        }
    }
}

/// Integers at field boundaries, written at aligned offsets as 1, 2, 4 or 8 bytes.
const BOUNDARIES: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

fn mutate_bytes(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    if data.is_empty() {
        return other.to_vec();
    }
    let at = rng.random_range(0..data.len());
    match rng.random_range(0..7) {
        0 => data[at] ^= 1 << rng.random_range(0..8),
        1 => data[at] = rng.random(),
        2 | 3 => {
            let width = 1 << rng.random_range(0..4);
            let at = at / width * width;
            let value = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())].to_le_bytes();
            let end = (at + width).min(data.len());
            data[at..end].copy_from_slice(&value[..end - at]);
        }
        4 => {
            // Splice: this input's head, the other's tail.
            let from = rng.random_range(0..=other.len());
            data.truncate(at);
            data.extend_from_slice(&other[from..]);
        }
        5 => {
            let end = rng.random_range(at..=data.len());
            data.drain(at..end);
        }
        _ => {
            let end = rng.random_range(at..=data.len().min(at + 4096));
            let chunk = data[at..end].to_vec();
            let to = rng.random_range(0..=data.len());
            data.splice(to..to, chunk);
        }
    }
    data
}

/// One tree mutation at a random node: numbers to extremes, strings to long or odd ones, arrays
/// doubled or cut, keys deleted, or the node swapped for another type.
fn mutate_json(rng: &mut StdRng, root: &mut Value) {
    let n = rng.random_range(0..count(root));
    let node = nth(root, n);
    if rng.random_bool(0.1) {
        *node = [Value::Null, 0.into(), "".into(), Value::Array(vec![]), Value::Object(Default::default())]
            [rng.random_range(0..5)]
        .clone();
        return;
    }
    match node {
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or(0.0);
            *node = match rng.random_range(0..6) {
                0 => BOUNDARIES[rng.random_range(0..BOUNDARIES.len())].into(),
                1 => (-(rng.random_range(1..=1u64 << 40) as i64)).into(),
                2 => [0.0, -0.0, 0.5, 1e-30, 1e30, 1e308, -1e308][rng.random_range(0..7)].into(),
                3 => (x * 2.0).into(),
                4 => (x + 1.0).into(),
                _ => (x - 1.0).into(),
            };
        }
        Value::String(s) => {
            *node = match rng.random_range(0..4) {
                0 => "".into(),
                1 => "A".repeat(1 << rng.random_range(4..17)).into(),
                2 => s.repeat(rng.random_range(2..64)).into(),
                _ => ["{{", "{%", "\u{0}", "ü\u{10ffff}\u{301}", "-1", "1e999", "NaN", "../../etc"]
                    [rng.random_range(0..8)]
                .into(),
            };
        }
        Value::Array(items) if !items.is_empty() => match rng.random_range(0..3) {
            0 => items.extend(items.clone()),
            1 => items.truncate(items.len() / 2),
            _ => {
                items.remove(rng.random_range(0..items.len()));
            }
        },
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(rng.random_range(0..map.len())).expect("in range").clone();
            map.remove(&key);
        }
        Value::Bool(b) => *b = !*b,
        _ => *node = 1.into(),
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

/// The `n`th node of `v` in pre-order.
fn nth(v: &mut Value, n: usize) -> &mut Value {
    if n == 0 {
        return v;
    }
    let mut n = n - 1;
    let children: Box<dyn Iterator<Item = &mut Value>> = match v {
        Value::Array(items) => Box::new(items.iter_mut()),
        Value::Object(map) => Box::new(map.values_mut()),
        _ => unreachable!("a leaf has no node {n}"),
    };
    for child in children {
        let size = count(child);
        if n < size {
            return nth(child, n);
        }
        n -= size;
    }
    unreachable!("node {n} is past the end")
}
