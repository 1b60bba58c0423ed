//! How a user function is named, sent, and found again in a worker.
//!
//! A task is a zero-sized closure or `fn` item. For each call the parent instantiates
//! one monomorphised runner, [`run_chunk`], for the task's types and sends its address
//! as an offset from [`anchor`], a function of this crate. Worker processes run
//! the very same executable (the parent starts `/proc/self/exe`), so the offset names
//! the same function there, whatever address-space randomisation did. Both sides
//! check that the address lies in the executable's code before using it, so a runner
//! compiled into a dynamic library is refused in the parent rather than missed in the
//! worker. Because the task has no size, the worker can produce it from nothing; there
//! is no state to carry. Only the parent can send requests (the channels are created
//! by the worker and handed to the parent alone), and every runner checks a
//! fingerprint of its types before touching the payload.

use std::marker::PhantomData;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;
use crate::wire::codec::{self, Reader};
use crate::wire::protocol::{ChunkHeader, Failure, TaskRef};
use crate::worker::state::{Accumulator, Sample, WorkerState};

mod guard;
mod image;

pub(crate) use guard::install_panic_hook;
use guard::{Capturing, guarded};
pub(crate) use image::check_of;
use image::{Image, fingerprint, fnv1a, fnv1a_continue};

/// One chunk in this many (by chunk number, the first included) is sampled: its
/// first items are timed phase by phase, and the worker splits the time of the
/// job's other chunks in the proportions that sample showed.
pub(crate) const SAMPLE_EVERY: u64 = 8;

/// Items at the start of a sampled chunk timed phase by phase (decode, task, encode).
/// Each costs four clock reads (about 0.1 us here), so a chunk of tiny items pays
/// well under 1%; the phases' shares of the chunk's measured total come from these.
/// The items after them run in the same loop as with no timing at all.
const SAMPLED_ITEMS: u64 = 8;

/// What one clock read costs here, subtracted from each timed phase so that phases
/// of a few nanoseconds are not measured as the clock's own cost.
fn clock_cost() -> u64 {
    static COST: OnceLock<u64> = OnceLock::new();
    *COST.get_or_init(|| {
        (0..64)
            .map(|_| {
                let start = Instant::now();
                let _ = std::hint::black_box(Instant::now());
                start.elapsed().as_nanos()
            })
            .min()
            .map_or(0, |n| u64::try_from(n / 2).unwrap_or(0))
    })
}

/// Nanoseconds from `from` to `to` less one clock read.
fn phase(from: Instant, to: Instant) -> u64 {
    let nanos = u64::try_from(to.duration_since(from).as_nanos()).unwrap_or(u64::MAX);
    nanos.saturating_sub(clock_cost())
}

/// Runs one chunk: decodes its items from the payload, runs the task, appends the
/// encoded results (or the partial result) to `out`.
pub(crate) type RawTask =
    fn(&mut WorkerState, &ChunkHeader, &[u8], &mut Vec<u8>) -> Result<(), Failure>;

impl TaskRef {
    /// Names the runner for mapping `T` to `U` with `M`, delivering into `S`;
    /// `None` when the runner is not in the program's executable.
    pub(crate) fn of<T, U, M, S>() -> Option<Self>
    where
        T: DeserializeOwned,
        U: Serialize + DeserializeOwned,
        M: Mapper<T, U>,
        S: Answer<U>,
    {
        Self::named(run_chunk::<T, U, M, S>, fingerprint::<(T, U, M, S)>())
    }

    /// Names the runner of an initializer `F: Fn(A) -> S` that stores its result as
    /// the worker's state; `None` when it is not in the program's executable.
    pub(crate) fn init<A, S, F>() -> Option<Self>
    where
        A: DeserializeOwned,
        S: 'static,
        F: Fn(A) -> S + Copy + Send + Sync,
    {
        Self::named(run_init::<A, S, F>, fingerprint::<(A, S, F)>())
    }

    /// Names the runner of a fold stage: `fold: Fn(A, T) -> A` folds each item into
    /// the worker's accumulator for the job, started by `identity()` and kept across
    /// chunks until a [`Request::Flush`](crate::wire::protocol::Request::Flush); `None` when
    /// it is not in the program's executable.
    pub(crate) fn fold<T, A, Id, F>() -> Option<Self>
    where
        T: DeserializeOwned,
        A: Serialize + 'static,
        Id: Fn() -> A + Copy + Send + Sync,
        F: Fn(A, T) -> A + Copy + Send + Sync,
    {
        Self::named(run_fold::<T, A, Id, F>, fingerprint::<(T, A, Id, F)>())
    }

    fn named(runner: RawTask, fingerprint: u64) -> Option<Self> {
        let offset = Image::get()?.offset_of(runner as usize)?;
        Some(Self {
            offset,
            fingerprint,
            check: check_of(offset, fingerprint),
        })
    }

    /// Finds the runner again in this process and runs the chunk with it.
    pub(crate) fn run(
        &self,
        state: &mut WorkerState,
        header: &ChunkHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Failure> {
        if self.check != check_of(self.offset, self.fingerprint) {
            return Err(Failure::Malformed {
                reason: "task reference fails its check".into(),
            });
        }
        let Some(address) = Image::get().and_then(|image| image.address_of(self.offset)) else {
            return Err(Failure::Malformed {
                reason: format!(
                    "task offset {:#x} is outside the program's code",
                    self.offset
                ),
            });
        };
        // SAFETY: `address` lies in this executable's code, at the distance from
        // `anchor` (intact, by its check) at which the parent found `run_chunk::<..>` with `TaskRef::of` (which refuses any runner
        // outside the executable). The parent runs the same executable (it starts
        // workers from `/proc/self/exe` and checks each worker's `binary_fingerprint`
        // at the handshake) and is the only process that can write to this worker's
        // request channel. So `address` is the entry of a `run_chunk` instantiation,
        // whose type is exactly `RawTask`; the runner then checks the fingerprint of
        // its type parameters before it reads the payload.
        let runner: RawTask = unsafe { std::mem::transmute::<usize, RawTask>(address) };
        // The runner guards each step of user code; this also catches what escapes
        // those guards, such as a panicking `Drop` of a value dropped on an early
        // return, and blames the chunk's first item.
        guarded(header.first_item, || runner(state, header, payload, out))?
    }
}

/// Identifies the executable: equal in the parent and a worker only when both run
/// the same build. Checked once per worker at the handshake.
pub(crate) fn binary_fingerprint() -> u64 {
    fn probe_of<F: Fn(u64) -> u64 + Copy + Send + Sync>(_: F) -> RawTask {
        run_chunk::<u64, u64, Plain<F>, Collect>
    }
    let probe = probe_of(|x| x.wrapping_add(1)) as usize;
    let init = install_panic_hook as fn() as usize;
    let mut hash = fnv1a(env!("CARGO_PKG_VERSION").as_bytes());
    for address in [probe, init] {
        let offset = Image::get().and_then(|image| image.offset_of(address));
        hash = fnv1a_continue(hash, &offset.unwrap_or(u64::MAX).to_le_bytes());
    }
    hash
}

const NOT_ZERO_SIZED: &str = "multiproc: a task (and an identity or reduce function) must be a `fn` item or a \
closure that captures nothing, because it is re-created in each worker process. Pass state \
with `Pool::map_with(items, &context, |context, item| ...)`, which sends the context once \
to each worker, or inside the items themselves.";

/// Fails the build, with [`NOT_ZERO_SIZED`], when `F` captures anything.
pub(crate) const fn assert_zero_sized<F>() {
    const { assert!(size_of::<F>() == 0, "{}", NOT_ZERO_SIZED) }
}

/// Produces the value of a zero-sized function type.
///
/// The parent holds a value of `F` (the caller passed it); this makes another one in
/// whichever process or thread runs the chunk.
fn conjure<F: Copy + Send + Sync>() -> F {
    assert_zero_sized::<F>();
    // SAFETY: `F` has size zero (checked at compile time just above), so a dangling,
    // well-aligned pointer is valid for a read of it, and the read yields the type's
    // one value: all values of a zero-sized type are the same bits (none). `F: Copy`
    // means duplicating a value is always allowed, and `Send + Sync` that it may be
    // used on any thread, so making a copy here breaks no invariant of `F`. In
    // practice `F` is a `fn` item or a closure that captures nothing.
    unsafe { std::ptr::NonNull::<F>::dangling().as_ptr().read() }
}

/// Calls the user's function on one item, with what it needs from the worker.
pub(crate) trait Mapper<T, U> {
    /// What the task sees besides its item, borrowed from the worker's state once
    /// per chunk.
    type Env<'a>;
    /// Finds the task's environment for a chunk of `job`.
    fn env(state: &mut WorkerState, job: u64) -> Result<Self::Env<'_>, Failure>;
    fn call(env: &mut Self::Env<'_>, item: T) -> U;
}

/// A task `Fn(T) -> U`.
pub(crate) struct Plain<F>(PhantomData<F>);

impl<T, U, F: Fn(T) -> U + Copy + Send + Sync> Mapper<T, U> for Plain<F> {
    type Env<'a> = ();
    fn env(_: &mut WorkerState, _: u64) -> Result<(), Failure> {
        Ok(())
    }
    #[inline]
    fn call(_: &mut (), item: T) -> U {
        conjure::<F>()(item)
    }
}

/// A task `Fn(&C, T) -> U` with a context value sent once per worker and job.
pub(crate) struct WithContext<F, C>(PhantomData<(F, C)>);

impl<T, U, C, F> Mapper<T, U> for WithContext<F, C>
where
    C: DeserializeOwned + 'static,
    F: Fn(&C, T) -> U + Copy + Send + Sync,
{
    type Env<'a> = &'a C;
    fn env(state: &mut WorkerState, job: u64) -> Result<&C, Failure> {
        state.context::<C>(job)
    }
    #[inline]
    fn call(context: &mut &C, item: T) -> U {
        conjure::<F>()(context, item)
    }
}

/// A task `Fn(&mut S, T) -> U` using the state the pool's initializer built in
/// this worker.
pub(crate) struct WithState<F, S>(PhantomData<(F, S)>);

impl<T, U, S, F> Mapper<T, U> for WithState<F, S>
where
    S: 'static,
    F: Fn(&mut S, T) -> U + Copy + Send + Sync,
{
    type Env<'a> = &'a mut S;
    fn env(state: &mut WorkerState, _: u64) -> Result<&mut S, Failure> {
        state.user::<S>()
    }
    #[inline]
    fn call(state: &mut &mut S, item: T) -> U {
        conjure::<F>()(state, item)
    }
}

/// How a worker answers a chunk: what happens to each result inside the worker
/// (encoded in order, folded into one partial, or written as an outcome per item).
pub(crate) trait Answer<U>: Sized {
    /// Whether `push` encodes each result (else only `finish` writes anything).
    const ENCODES_EACH: bool;
    /// Whether each item's outcome is written, success or failure, so a failed item
    /// ends neither the chunk nor the other items (see [`Outcomes`]).
    const OUTCOMES: bool = false;
    fn start() -> Self;
    fn push(&mut self, value: U, out: &mut Vec<u8>) -> Result<(), CodecError>;
    fn finish(self, out: &mut Vec<u8>) -> Result<(), CodecError>;
}

/// `map`: every result is encoded, in item order.
pub(crate) struct Collect;

impl<U: Serialize> Answer<U> for Collect {
    const ENCODES_EACH: bool = true;
    fn start() -> Self {
        Collect
    }
    #[inline]
    fn push(&mut self, value: U, out: &mut Vec<u8>) -> Result<(), CodecError> {
        codec::encode_into(&value, out)
    }
    fn finish(self, _: &mut Vec<u8>) -> Result<(), CodecError> {
        // A descriptor a result moved out of band must not ride on the reply.
        codec::flush()
    }
}

/// Independent items (`apply_async`): each item's outcome is written as a tag byte,
/// then the encoded result's length (`u64`, little endian) and the encoded result
/// (tag [`OUTCOME_OK`]), or the encoded [`Failure`] (tag [`OUTCOME_FAILED`]), so the
/// parent can split a chunk's outcomes without knowing the result type. A failed
/// item does not stop the chunk.
pub(crate) struct Outcomes;

/// Tag of a successful item under [`Outcomes`].
pub(crate) const OUTCOME_OK: u8 = 0;
/// Tag of a failed item under [`Outcomes`].
pub(crate) const OUTCOME_FAILED: u8 = 1;
/// Bytes in front of a successful result under [`Outcomes`]: tag and length.
const OUTCOME_PREFIX: usize = 9;

impl<U: Serialize> Answer<U> for Outcomes {
    const ENCODES_EACH: bool = true;
    const OUTCOMES: bool = true;
    fn start() -> Self {
        Outcomes
    }
    #[inline]
    fn push(&mut self, value: U, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        out.push(OUTCOME_OK);
        out.extend_from_slice(&[0; 8]);
        codec::encode_into(&value, out).inspect_err(|_| out.truncate(start))?;
        let len = (out.len() - start - OUTCOME_PREFIX) as u64;
        out[start + 1..start + OUTCOME_PREFIX].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }
    fn finish(self, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Ok(())
    }
}

/// `map_reduce`: results are folded into one partial per chunk, starting from
/// `identity()`, and only the partial is encoded (a combiner, as in Hadoop).
pub(crate) struct Fold<U, Id, R> {
    acc: Option<U>,
    _functions: PhantomData<(Id, R)>,
}

impl<U, Id, R> Answer<U> for Fold<U, Id, R>
where
    U: Serialize,
    Id: Fn() -> U + Copy + Send + Sync,
    R: Fn(U, U) -> U + Copy + Send + Sync,
{
    const ENCODES_EACH: bool = false;
    fn start() -> Self {
        Self {
            acc: Some(conjure::<Id>()()),
            _functions: PhantomData,
        }
    }
    #[inline]
    fn push(&mut self, value: U, _: &mut Vec<u8>) -> Result<(), CodecError> {
        let acc = self
            .acc
            .take()
            .expect("a fold that panicked is never pushed to again");
        self.acc = Some(conjure::<R>()(acc, value));
        Ok(())
    }
    fn finish(self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let acc = self.acc.expect("a fold that panicked is never finished");
        codec::encode_into(&acc, out)?;
        codec::flush()
    }
}

/// One item of a chunk, in [`run_chunk`] and [`timed_items`]: `$run` runs it
/// (timed or not), or it is read past when it is on the skip list. A macro, so that
/// the untimed loop is exactly the loop of a worker that times nothing.
macro_rules! chunk_item {
    ($first:expr, $i:expr, $progress:expr, $skip:expr, $env:expr, $reader:expr, $sink:expr,
     $out:ident, $run:ident $(, $sample:expr)?) => {{
        let i = $i;
        let item = $first.wrapping_add(i);
        if let Some(progress) = $progress {
            // If this item kills the process, the parent reads which one it was.
            progress.store(item.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
        }
        if $skip.next_if(|&offset| u64::from(offset) == i).is_some() {
            // Reported failed already: read past it, run nothing, write nothing.
            guarded(item, || $reader.decode::<T>().map(drop))?
                .map_err(|error| Failure::DecodeItem { item, error })?;
            continue;
        }
        let before = $out.len();
        let outcome = $run::<T, U, M, S>(item, $env, $reader, $sink, $out $(, $sample)?);
        match outcome {
            Ok(()) => {}
            Err(failure) if S::OUTCOMES => {
                // The item's bytes were consumed or are lost with the failure: a
                // decode failure leaves the reader where it cannot find the next
                // item, so only a failure after decoding lets the chunk go on.
                $out.truncate(before);
                let decoded = !matches!(failure, Failure::DecodeItem { .. });
                $out.push(OUTCOME_FAILED);
                codec::encode_into(&failure, $out).map_err(|error| Failure::EncodeResult {
                    item: Some(item),
                    error,
                })?;
                if !decoded {
                    return Err(failure);
                }
            }
            Err(failure) => return Err(failure),
        }
        if item == 0 && S::ENCODES_EACH && (!S::OUTCOMES || $out.get(before) == Some(&OUTCOME_OK)) {
            let skip = if S::OUTCOMES { OUTCOME_PREFIX } else { 0 };
            round_trip::<U>(item, &$out[before + skip..], Some(item))?;
        }
    }};
}

/// The skip list of a chunk as [`run_chunk`] walks it.
type SkipList<'h> = std::iter::Peekable<std::iter::Copied<std::slice::Iter<'h, u32>>>;

/// What [`run_chunk`] walks a chunk with: the task's environment, the items'
/// reader, the results' sink and the skip list.
type Walk<'e, 'r, 'h, E, S> = (E, Reader<'r>, S, SkipList<'h>);

/// The first `count` items of a chunk, each timed phase by phase into `sample`;
/// gives back what it walked them with.
#[inline(never)]
fn timed_items<'e, 'r, 'h, T, U, M, S>(
    first: u64,
    count: u64,
    walk: Walk<'e, 'r, 'h, M::Env<'e>, S>,
    progress: Option<&std::sync::atomic::AtomicU64>,
    out: &mut Vec<u8>,
    sample: &mut Sample,
) -> Result<Walk<'e, 'r, 'h, M::Env<'e>, S>, Failure>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Answer<U>,
{
    let (mut env, mut reader, mut sink, mut skip) = walk;
    for i in 0..count {
        chunk_item!(
            first,
            i,
            progress,
            skip,
            &mut env,
            &mut reader,
            &mut sink,
            out,
            run_item_timed,
            sample
        );
    }
    Ok((env, reader, sink, skip))
}

/// The monomorphised runner a [`TaskRef`] names.
fn run_chunk<T, U, M, S>(
    state: &mut WorkerState,
    header: &ChunkHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Failure>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Answer<U>,
{
    if header.task.fingerprint != fingerprint::<(T, U, M, S)>() {
        return Err(Failure::Malformed {
            reason: "task fingerprint does not match the function at its offset".into(),
        });
    }
    if header.chunk.is_multiple_of(SAMPLE_EVERY) {
        return run_chunk_sampled::<T, U, M, S>(state, header, payload, out);
    }
    let first = header.first_item;
    // Everything from here runs user code (`Deserialize`, the task, `Serialize`,
    // identity and reduce), so every step is guarded: a panic names its item.
    let _capturing = Capturing::start();
    let mut env = guarded(first, || M::env(state, header.job))??;
    let mut reader = Reader::new(payload);
    let mut sink = guarded(first, S::start)?;
    let progress = crate::wire::transport::progress();
    let mut skip = header.skip.iter().copied().peekable();
    for i in 0..u64::from(header.count) {
        chunk_item!(
            first,
            i,
            progress,
            skip,
            &mut env,
            &mut reader,
            &mut sink,
            out,
            run_item
        );
    }
    close_chunk::<U, S>(header, &reader, sink, out, None)
}

/// The end of a chunk, once its items ran: every byte of the payload read, and the
/// sink's closing step (a partial result encoded, checked once on a job's first
/// chunk), whose time goes to `finish_nanos` when asked for.
#[inline(always)]
fn close_chunk<U, S>(
    header: &ChunkHeader,
    reader: &Reader<'_>,
    sink: S,
    out: &mut Vec<u8>,
    finish_nanos: Option<&mut u64>,
) -> Result<(), Failure>
where
    U: Serialize + DeserializeOwned,
    S: Answer<U>,
{
    if !reader.is_empty() {
        return Err(Failure::Malformed {
            reason: format!(
                "{} bytes left after the chunk's {} items",
                reader.remaining(),
                header.count
            ),
        });
    }
    let first = header.first_item;
    let last = first.wrapping_add(u64::from(header.count).saturating_sub(1));
    let before = out.len();
    let finishing = finish_nanos.is_some().then(Instant::now);
    guarded(last, || sink.finish(out))?
        .map_err(|error| Failure::EncodeResult { item: None, error })?;
    if let (Some(nanos), Some(finishing)) = (finish_nanos, finishing) {
        *nanos = phase(finishing, Instant::now());
    }
    if first == 0 && !S::ENCODES_EACH {
        round_trip::<U>(last, &out[before..], None)?;
    }
    Ok(())
}

/// [`run_chunk`] for a sampled chunk: its first items are timed phase by phase
/// into `state.sample`. Kept out of `run_chunk`, whose per-item loop is then the
/// same as if nothing were measured (timing code beside that loop, even code that
/// never runs, was measured to cost it 5 to 12 instructions an item).
#[inline(never)]
fn run_chunk_sampled<T, U, M, S>(
    state: &mut WorkerState,
    header: &ChunkHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Failure>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Answer<U>,
{
    let first = header.first_item;
    // Everything from here runs user code (`Deserialize`, the task, `Serialize`,
    // identity and reduce), so every step is guarded: a panic names its item.
    let _capturing = Capturing::start();
    let mut sample = Sample::default();
    let count = u64::from(header.count);
    let env = guarded(first, || M::env(state, header.job))??;
    let reader = Reader::new(payload);
    let sink = guarded(first, S::start)?;
    let progress = crate::wire::transport::progress();
    let skip = header.skip.iter().copied().peekable();
    // The chunk's first items are timed phase by phase, in a function of their
    // own; the rest run in the very loop of a worker that times nothing.
    let timed = count.min(SAMPLED_ITEMS);
    // Moved in and out, not lent: a local whose address escaped to a call would
    // stay in memory through the loop below, costing loads and stores per item.
    let (mut env, mut reader, mut sink, mut skip) = timed_items::<T, U, M, S>(
        first,
        timed,
        (env, reader, sink, skip),
        progress,
        out,
        &mut sample,
    )?;
    for i in timed..count {
        chunk_item!(
            first,
            i,
            progress,
            skip,
            &mut env,
            &mut reader,
            &mut sink,
            out,
            run_item
        );
    }
    // A partial result's encoding is timed whole; results encoded one by one were
    // timed with their items.
    let finish = (!S::ENCODES_EACH).then_some(&mut sample.finish);
    close_chunk::<U, S>(header, &reader, sink, out, finish)?;
    drop(env);
    state.sample = sample;
    Ok(())
}

/// The runner of a fold stage: folds the chunk's items into the worker's accumulator
/// for the job and replies with nothing; the accumulator leaves the worker only when
/// the parent asks for it ([`flush_fold`]).
fn run_fold<T, A, Id, F>(
    state: &mut WorkerState,
    header: &ChunkHeader,
    payload: &[u8],
    _out: &mut Vec<u8>,
) -> Result<(), Failure>
where
    T: DeserializeOwned,
    A: Serialize + 'static,
    Id: Fn() -> A + Copy + Send + Sync,
    F: Fn(A, T) -> A + Copy + Send + Sync,
{
    if header.task.fingerprint != fingerprint::<(T, A, Id, F)>() {
        return Err(Failure::Malformed {
            reason: "task fingerprint does not match the function at its offset".into(),
        });
    }
    let first = header.first_item;
    let _capturing = Capturing::start();
    let mut acc = match state.take_fold(header.job) {
        Some(kept) => *kept.value.downcast::<A>().map_err(|_| Failure::Malformed {
            reason: format!("job {} folds into two types", header.job),
        })?,
        None => guarded(first, conjure::<Id>())?,
    };
    let mut reader = Reader::new(payload);
    let progress = crate::wire::transport::progress();
    let mut skip = header.skip.iter().copied().peekable();
    let mut sample = Sample::default();
    for i in 0..u64::from(header.count) {
        let item = first.wrapping_add(i);
        if let Some(progress) = progress {
            progress.store(item.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
        }
        let timed = i < SAMPLED_ITEMS;
        let started = timed.then(Instant::now);
        let value = guarded(item, || reader.decode::<T>())?
            .map_err(|error| Failure::DecodeItem { item, error })?;
        if skip.next_if(|&offset| u64::from(offset) == i).is_some() {
            continue;
        }
        let decoded = timed.then(Instant::now);
        // A panic loses the accumulator with the item: the job fails (fold jobs stop
        // at their first failure), so nothing folded is delivered in part.
        acc = guarded(item, || conjure::<F>()(acc, value))?;
        if let (Some(started), Some(decoded)) = (started, decoded) {
            sample.decode += phase(started, decoded);
            sample.task += phase(decoded, Instant::now());
        }
    }
    if !reader.is_empty() {
        return Err(Failure::Malformed {
            reason: format!(
                "{} bytes left after the chunk's {} items",
                reader.remaining(),
                header.count
            ),
        });
    }
    state.put_fold(
        header.job,
        Accumulator {
            value: Box::new(acc),
            encode: encode_accumulator::<A>,
        },
    );
    state.sample = sample;
    Ok(())
}

/// Encodes a fold job's accumulator, of the type its runner put there.
fn encode_accumulator<A: Serialize + 'static>(
    value: Box<dyn std::any::Any>,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let value = value
        .downcast::<A>()
        .map_err(|_| CodecError("an accumulator of another type".into()))?;
    codec::encode_into(&*value, out)?;
    codec::flush()
}

/// Answers a flush: appends the encoded accumulator of fold job `job` to `out` and
/// drops it (the next chunk starts a new one), or appends nothing when the worker
/// holds none.
pub(crate) fn flush_fold(
    state: &mut WorkerState,
    job: u64,
    out: &mut Vec<u8>,
) -> Result<(), Failure> {
    let Some(acc) = state.take_fold(job) else {
        return Ok(());
    };
    let _capturing = Capturing::start();
    let start = out.len();
    // `Serialize` and `Drop` of the accumulator are user code.
    guarded(0, || (acc.encode)(acc.value, out))?.map_err(|error| {
        out.truncate(start);
        Failure::EncodeResult { item: None, error }
    })
}

/// Decodes one item, runs the task on it and hands the result to the sink. Always
/// inlined: it is the body of the per-item loop, and without LTO a generic caller
/// otherwise decides differently from build to build.
#[inline(always)]
fn run_item<T, U, M, S>(
    item: u64,
    env: &mut M::Env<'_>,
    reader: &mut Reader<'_>,
    sink: &mut S,
    out: &mut Vec<u8>,
) -> Result<(), Failure>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Answer<U>,
{
    let value: T =
        guarded(item, || reader.decode())?.map_err(|error| Failure::DecodeItem { item, error })?;
    let result = guarded(item, || M::call(env, value))?;
    guarded(item, || sink.push(result, out))?.map_err(|error| Failure::EncodeResult {
        item: Some(item),
        error,
    })
}

/// [`run_item`], timing each phase into `sample`. A result folded into a partial
/// (a `map_reduce` chunk) is the task's work, not encoding.
#[inline(never)]
fn run_item_timed<T, U, M, S>(
    item: u64,
    env: &mut M::Env<'_>,
    reader: &mut Reader<'_>,
    sink: &mut S,
    out: &mut Vec<u8>,
    sample: &mut Sample,
) -> Result<(), Failure>
where
    T: DeserializeOwned,
    U: Serialize + DeserializeOwned,
    M: Mapper<T, U>,
    S: Answer<U>,
{
    let started = Instant::now();
    let value: T =
        guarded(item, || reader.decode())?.map_err(|error| Failure::DecodeItem { item, error })?;
    let decoded = Instant::now();
    let result = guarded(item, || M::call(env, value))?;
    let ran = Instant::now();
    let pushed = guarded(item, || sink.push(result, out))?.map_err(|error| Failure::EncodeResult {
        item: Some(item),
        error,
    });
    let end = Instant::now();
    sample.decode += phase(started, decoded);
    sample.task += phase(decoded, ran);
    if S::ENCODES_EACH {
        sample.encode += phase(ran, end);
    } else {
        sample.task += phase(ran, end);
    }
    pushed
}

/// The runner of an initializer: decodes its argument, builds the state and keeps
/// it in the worker; a failure is remembered so that tasks needing the state say why.
fn run_init<A, S, F>(
    state: &mut WorkerState,
    header: &ChunkHeader,
    payload: &[u8],
    _out: &mut Vec<u8>,
) -> Result<(), Failure>
where
    A: DeserializeOwned,
    S: 'static,
    F: Fn(A) -> S + Copy + Send + Sync,
{
    if header.task.fingerprint != fingerprint::<(A, S, F)>() {
        return Err(Failure::Malformed {
            reason: "initializer fingerprint does not match the function at its offset".into(),
        });
    }
    let _capturing = Capturing::start();
    let built = guarded(0, || codec::decode::<A>(payload))
        .and_then(|arg| arg.map_err(|error| Failure::DecodeItem { item: 0, error }))
        .and_then(|arg| guarded(0, || conjure::<F>()(arg)));
    match built {
        Ok(value) => {
            state.set_user(Box::new(value));
            Ok(())
        }
        Err(failure) => {
            let reason = match &failure {
                Failure::Panicked { panic, .. } => format!("it panicked: {panic}"),
                Failure::DecodeItem { error, .. } => {
                    format!("its argument did not decode: {error}")
                }
                other => format!("{other:?}"),
            };
            state.set_user_failed(reason);
            Err(failure)
        }
    }
}

/// Checks that the first result of a call decodes again, which catches most types
/// whose serde attributes need a self-describing format (see the crate docs).
fn round_trip<U: DeserializeOwned>(
    at: u64,
    bytes: &[u8],
    item: Option<u64>,
) -> Result<(), Failure> {
    // The decoded value is dropped inside the guard: its `Drop` is user code too.
    match guarded(at, || codec::decode::<U>(bytes).map(drop))? {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::EncodeResult {
            item,
            error: CodecError(format!("the result does not decode again: {e}")),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u64) -> u64 {
        x * 2
    }

    fn plain_ref<F: Fn(u64) -> u64 + Copy + Send + Sync>(_: F) -> TaskRef {
        TaskRef::of::<u64, u64, Plain<F>, Collect>().expect("the test's code is in its executable")
    }

    #[test]
    fn a_damaged_reference_is_refused_before_its_offset_is_used() {
        let good = plain_ref(double);
        for bit in 0..64 {
            let bad = TaskRef {
                offset: good.offset ^ (1 << bit),
                ..good
            };
            let err = run(bad, &[1]).unwrap_err();
            assert!(
                matches!(&err, Failure::Malformed { reason } if reason.contains("check")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn offsets_outside_the_code_are_refused_before_any_jump() {
        let good = plain_ref(double);
        // Far outside any code mapping (offsets near zero name code next to the
        // anchor: only the check hash stands between those and a jump).
        for offset in [
            1 << 40,
            (1u64 << 40).wrapping_neg(),
            good.offset ^ (1 << 44),
        ] {
            let bad = TaskRef {
                offset,
                check: check_of(offset, good.fingerprint),
                ..good
            };
            let err = run(bad, &[1]).unwrap_err();
            assert!(matches!(err, Failure::Malformed { .. }), "{err:?}");
        }
    }

    fn chunk(task: TaskRef, items: &[u64]) -> (ChunkHeader, Vec<u8>) {
        let mut payload = Vec::new();
        for item in items {
            codec::encode_into(item, &mut payload).unwrap();
        }
        let header = ChunkHeader {
            job: 1,
            chunk: 0,
            first_item: 100,
            count: items.len() as u32,
            task,
            skip: Vec::new(),
            unsealed: Vec::new(),
        };
        (header, payload)
    }

    fn run(task: TaskRef, items: &[u64]) -> Result<Vec<u64>, Failure> {
        let (header, payload) = chunk(task, items);
        let mut out = Vec::new();
        task.run(&mut WorkerState::default(), &header, &payload, &mut out)?;
        let mut reader = Reader::new(&out);
        Ok((0..items.len()).map(|_| reader.decode().unwrap()).collect())
    }

    #[test]
    fn a_task_ref_runs_its_task_in_this_process() {
        assert_eq!(run(plain_ref(double), &[1, 2, 3]).unwrap(), [2, 4, 6]);
        assert_eq!(run(plain_ref(|x| x + 1), &[1, 2, 3]).unwrap(), [2, 3, 4]);
    }

    #[test]
    fn items_on_the_skip_list_are_read_past_and_not_run() {
        install_panic_hook();
        let task = plain_ref(|x| {
            if x == 13 {
                panic!("unlucky {x}")
            } else {
                x * 2
            }
        });
        let (mut header, payload) = chunk(task, &[11, 12, 13, 14]);
        header.skip = vec![2];
        let mut out = Vec::new();
        task.run(&mut WorkerState::default(), &header, &payload, &mut out)
            .unwrap();
        let mut reader = Reader::new(&out);
        let results: Vec<u64> = (0..3).map(|_| reader.decode().unwrap()).collect();
        assert_eq!(results, [22, 24, 28]);
        assert!(reader.is_empty());
    }

    #[test]
    fn different_tasks_get_different_refs() {
        assert_ne!(plain_ref(double), plain_ref(|x| x + 1));
        assert_eq!(plain_ref(double), plain_ref(double));
    }

    #[test]
    fn a_mismatched_fingerprint_is_refused() {
        let good = plain_ref(double);
        let fingerprint = good.fingerprint ^ 1;
        let bad = TaskRef {
            fingerprint,
            check: check_of(good.offset, fingerprint),
            ..good
        };
        assert!(matches!(run(bad, &[1]), Err(Failure::Malformed { .. })));
    }

    #[test]
    fn a_panic_names_its_item_and_location() {
        install_panic_hook();
        let task = plain_ref(|x| if x == 13 { panic!("unlucky {x}") } else { x });
        let (mut header, payload) = chunk(task, &[11, 12, 13, 14]);
        header.first_item = 10;
        let err = task
            .run(
                &mut WorkerState::default(),
                &header,
                &payload,
                &mut Vec::new(),
            )
            .unwrap_err();
        let Failure::Panicked { item, panic } = err else {
            panic!("expected a panic, got {err:?}")
        };
        assert_eq!(item, 12);
        assert_eq!(panic.message, "unlucky 13");
        assert!(panic.location.unwrap().contains(file!()));
    }

    #[test]
    fn undecodable_items_name_the_item() {
        let task = plain_ref(double);
        let (header, mut payload) = chunk(task, &[1, 2]);
        payload.truncate(12);
        let err = task
            .run(
                &mut WorkerState::default(),
                &header,
                &payload,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(
            matches!(err, Failure::DecodeItem { item: 101, .. }),
            "{err:?}"
        );
    }
}
