//! The one reader of the kernel's per-CPU counter arrays: each program family keeps its
//! counters in slot 0 of a `PERCPU_ARRAY`, one copy per CPU, summed here on read.

use std::borrow::Borrow;

use aya::Pod;
use aya::maps::{MapData, MapError, PerCpuArray};

/// Slot 0 of the per-CPU array `map` (borrowed from a loaded object or opened from a pin),
/// summed over CPUs with the counters' own `merge`.
pub(crate) fn sum<M, T, V>(map: M, merge: fn(V, V) -> V) -> Result<V, MapError>
where
    PerCpuArray<T, V>: TryFrom<M, Error = MapError>,
    T: Borrow<MapData>,
    V: Pod + Default,
{
    let arr = PerCpuArray::<T, V>::try_from(map)?;
    let per_cpu = arr.get(&0, 0)?;
    Ok(per_cpu.iter().fold(V::default(), |acc, v| merge(acc, *v)))
}
