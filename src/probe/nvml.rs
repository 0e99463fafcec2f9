//! GPU inventory and memory sampling through NVML (`nvml-wrapper`, which loads
//! `libnvidia-ml.so.1` at run time, so this module is compiled in every build). Without an NVIDIA
//! driver, [`inventory`] returns one line saying so and the probe continues on the CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::Serialize;

/// A process using a GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// None when the driver does not report it.
    pub used_bytes: Option<u64>,
}

/// One GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// `major.minor`, e.g. `9.0` for H100/H200.
    pub compute_capability: String,
    pub processes: Vec<GpuProcess>,
    /// Memory the other processes on this GPU hold (those the driver reports a size for; this
    /// process excluded).
    pub other_processes_bytes: u64,
}

/// Bytes held by processes other than `own_pid` (unreported sizes count as 0).
pub fn other_processes_bytes(processes: &[GpuProcess], own_pid: u32) -> u64 {
    processes
        .iter()
        .filter(|p| p.pid != own_pid)
        .filter_map(|p| p.used_bytes)
        .sum()
}

/// What NVML reports for the machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub driver: String,
    /// The CUDA version the driver supports, e.g. `13.0`.
    pub cuda_driver: String,
    pub gpus: Vec<GpuInfo>,
}

fn gpu(nvml: &Nvml, index: u32) -> Result<GpuInfo, nvml_wrapper::error::NvmlError> {
    let d = nvml.device_by_index(index)?;
    let mem = d.memory_info()?;
    let cc = d.cuda_compute_capability()?;
    let processes = d
        .running_compute_processes()
        .unwrap_or_default()
        .into_iter()
        .map(|p| GpuProcess {
            pid: p.pid,
            used_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
        })
        .collect::<Vec<_>>();
    Ok(GpuInfo {
        other_processes_bytes: other_processes_bytes(&processes, std::process::id()),
        index,
        name: d.name()?,
        total_bytes: mem.total,
        used_bytes: mem.used,
        free_bytes: mem.free,
        compute_capability: format!("{}.{}", cc.major, cc.minor),
        processes,
    })
}

/// Reads every GPU, or says in one line why NVML is not usable.
pub fn inventory() -> Result<Inventory, String> {
    let nvml = Nvml::init().map_err(|e| {
        format!("NVML not available ({e}): no NVIDIA driver found; continuing on the CPU")
    })?;
    let fail = |what: &str, e: nvml_wrapper::error::NvmlError| format!("NVML {what} failed: {e}");
    let driver = nvml
        .sys_driver_version()
        .map_err(|e| fail("driver version", e))?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .map_err(|e| fail("CUDA driver version", e))?;
    let count = nvml.device_count().map_err(|e| fail("device count", e))?;
    let gpus = (0..count)
        .map(|i| gpu(&nvml, i).map_err(|e| fail(&format!("device {i}"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Inventory {
        driver,
        // nvml-wrapper: version = 1000·major + 10·minor.
        cuda_driver: format!("{}.{}", cuda / 1000, (cuda % 1000) / 10),
        gpus,
    })
}

/// Samples NVML used memory of one device on a background thread until stopped.
#[derive(Debug)]
pub struct UsedMemorySampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

impl UsedMemorySampler {
    /// Starts sampling device `index` every `period`.
    pub fn start(index: u32, period: Duration) -> Result<UsedMemorySampler, String> {
        let nvml = Nvml::init().map_err(|e| format!("NVML not available: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            let d = nvml.device_by_index(index).map_err(|e| e.to_string())?;
            loop {
                let used = d.memory_info().map_err(|e| e.to_string())?.used;
                p.fetch_max(used, Ordering::Relaxed);
                if s.load(Ordering::Relaxed) {
                    return Ok(p.load(Ordering::Relaxed));
                }
                std::thread::sleep(period);
            }
        });
        Ok(UsedMemorySampler {
            stop,
            peak,
            handle: Some(handle),
        })
    }

    /// The highest used bytes seen so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Forgets the peak (the next sample starts a new window).
    pub fn reset(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    /// Stops the thread (after one last sample) and returns the peak.
    pub fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the NVML sampling thread panicked".into()),
            None => Ok(self.peak()),
        }
    }
}

impl Drop for UsedMemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_processes_leave_this_one_and_unreported_sizes_out() {
        let p = |pid, used_bytes| GpuProcess { pid, used_bytes };
        let procs = [
            p(1, Some(3 << 30)),
            p(2, None),
            p(7, Some(1 << 30)),
            p(9, Some(5)),
        ];
        assert_eq!(other_processes_bytes(&procs, 7), (3 << 30) + 5);
    }

    #[test]
    fn without_a_driver_inventory_says_so_in_one_line() {
        // On a machine with NVIDIA's driver this reads real GPUs; otherwise it must be one clear
        // line, not a panic.
        match inventory() {
            Ok(inv) => assert!(!inv.driver.is_empty()),
            Err(line) => {
                assert!(!line.contains('\n'));
                assert!(line.contains("NVML"), "{line}");
            }
        }
    }
}
