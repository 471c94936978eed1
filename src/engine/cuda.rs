//! Jetson GPU: optimized plans go through tract's CUDA runtime when a CUDA
//! driver and its libraries are present. tract-cuda loads them at run time,
//! so a `cuda` build still runs, on the CPU, where there is no GPU.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::runtime_for_name;

/// Probed once: the driver, cudart, NVRTC, cuBLAS and cuDNN all load.
fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        match tract_cuda::utils::ensure_cuda_runtime_dependencies("CUDA runtime") {
            Ok(()) => {
                log::info!("CUDA driver and libraries found: graphs run on the GPU");
                true
            }
            Err(e) => {
                log::warn!("no usable CUDA driver, running on the CPU: {e:#}");
                false
            }
        }
    })
}

/// The graph prepared by the CUDA runtime, or `None` to take the CPU path:
/// no CUDA here, or the runtime could not take this graph (logged).
pub(super) fn prepare(typed: &TypedModel) -> Result<Option<Arc<TypedRunnableModel>>> {
    if !cuda_available() {
        return Ok(None);
    }
    let runtime = runtime_for_name("cuda")
        .map_err(|e| anyhow!("{e:#}"))?
        .ok_or_else(|| anyhow!("tract's CUDA runtime is not registered in this build"))?;
    let model = typed
        .clone()
        .into_decluttered()
        .map_err(|e| anyhow!("{e:#}"))?;
    // tract-cuda panics when the libraries load but no device context can be
    // made (no GPU visible to this process): that must mean CPU, not a crash.
    let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| runtime.prepare(model)));
    let runnable = match prepared {
        Ok(Ok(runnable)) => runnable,
        Ok(Err(e)) => {
            log::warn!("CUDA runtime cannot run this graph, using the CPU: {e:#}");
            return Ok(None);
        }
        Err(_) => {
            log::warn!("CUDA device could not be opened, using the CPU");
            return Ok(None);
        }
    };
    let plan = runnable
        .typed_plan()
        .cloned()
        .ok_or_else(|| anyhow!("tract's CUDA runtime returned a plan without a typed model"))?;
    Ok(Some(plan))
}
