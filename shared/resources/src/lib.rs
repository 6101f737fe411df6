//! Resource strings in cube-studio's grammar: CPU, memory and GPU requests and limits, parsed into typed values,
//! checked, and rendered back in a canonical form.
//!
//! | Kind | Accepted | Meaning |
//! |---|---|---|
//! | CPU | `2`, `0.5`, `1~4`, `0~4` | cores; `a~b` is request a, limit b; a plain value is request = limit |
//! | memory | `4G`, `512M`, `2G~8G`, `0~8G`, `16Gi` | a whole number with unit M, G or T (binary: `4G` = `4Gi`) |
//! | GPU | `1`, `2(T4)`, `1(nvidia,V100)`, `0.25`, `0`, empty | whole GPUs, optionally vendor and type; below 1 a vGPU share |
//!
//! The grammar is cube-studio's, made strict where cube-studio was sloppy:
//! - CPU: at most 3 decimals (millicores), a leading-dot `.5` is accepted (Python's `float()` took it), extra
//!   trailing zeros (`0.5000`) too. A plain value must be above 0; in a range the request may be 0 (cube-studio's
//!   non-exclusive notebooks and services ran as `0~n`), the limit must be above 0 and the request at most the limit.
//!   No unit: `500m` is refused with a hint to write `0.5`.
//! - Memory: whole numbers only (cube-studio's `^[0-9]+[GM]$`), `1.5G` is refused with a hint to write `1536M`. The
//!   unit is case-insensitive as cube-studio upper-cased the input, so `4g` is `4G` and `512m` is 512 MiB (not
//!   Kubernetes' millibytes). `M`/`Mi`, `G`/`Gi` and `T`/`Ti` are all binary, as in cube-studio's volume sizes and
//!   in `cube-volumes`: cube-studio handed `4G` to Kubernetes as the decimal 4×10⁹ bytes, Cube requests `4Gi`, 7%
//!   more, which is what users writing `4G` mean. A request of 0 may omit the unit (`0~8G`).
//! - Ranges: `~` is the separator; `-`, `_` (cube-studio rewrote those to `~` for memory) and the full-width `～` are
//!   accepted for CPU and memory alike. A leading `-` is a negative number and is refused.
//! - GPU: parentheses may be full-width `（ ）` as in cube-studio, and so may the comma `，`. One word names the type
//!   (upper-cased, `2(t4)` is `2(T4)`), two words `vendor,type` name the vendor (lower-cased) and the type; the
//!   scheduler's placement treats a lone word that is a configured vendor name as the vendor, as cube-studio's
//!   `1(gpu)` did. Whole GPUs that are not integers (`1.5`) are refused where cube-studio truncated them; `1.0` is
//!   one GPU. A value strictly between 0 and 1 with at most 3 decimals is a vGPU share and may name a vendor and
//!   type like whole GPUs (`0.5(T4)`: half a T4). `0`, `0.0` and the empty string are no GPU; `0(T4)` is refused
//!   because it names a type but asks for nothing.
//! - Whitespace around values, units, separators and words is ignored.
//!
//! For every accepted text `t`, `t.parse()?.to_string()` is the canonical form, which parses back to the same value.

mod cpu;
mod error;
mod gpu;
mod memory;
mod number;
pub mod quantity;

pub use cpu::CpuSpec;
pub use error::{ParseError, Problem, ResourceKind};
pub use gpu::GpuSpec;
pub use memory::MemorySpec;
