//! Launching a [`KernelSource`]'s entry points on candle's CUDA tensors: the module is
//! compiled once per process for the device's architecture and loaded through candle's
//! per-device cache; inputs are read in place from contiguous tensors, outputs are fresh
//! device buffers wrapped as tensors, or a tensor written in place (running sums).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Shape, Storage, Tensor};

use super::KernelSource;
use crate::{Error, Result};

/// The PTX of `source` for `device`'s virtual architecture, compiled once per process and
/// architecture (a machine may mix GPU generations).
fn ptx(source: &KernelSource, device: &CudaDevice) -> Result<&'static str> {
    type Key = (&'static str, Option<&'static str>);
    type Compiled = std::result::Result<&'static str, String>;
    static PTX: Mutex<Option<HashMap<Key, Compiled>>> = Mutex::new(None);
    let arch = virtual_arch(device);
    let mut cache = PTX.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let compiled = cache
        .get_or_insert_with(HashMap::new)
        .entry((source.module, arch))
        .or_insert_with(|| {
            source
                .compile_ptx(arch)
                .map(|p| &*Box::leak(p.to_src().into_boxed_str()))
                .map_err(|e| e.to_string())
        });
    compiled.clone().map_err(Error::Cuda)
}

/// The device's compute capability `(major, minor)`, e.g. `(9, 0)` for an H100.
pub fn compute_capability(device: &CudaDevice) -> Option<(i32, i32)> {
    let stream = device.cuda_stream();
    let context = stream.context();
    let major = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .ok()?;
    let minor = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .ok()?;
    Some((major, minor))
}

/// The newest virtual architecture NVRTC 13 compiles for that the device runs: its own, or
/// for a device newer than this list the closest older one (the driver JIT-compiles PTX for
/// newer devices). `None` (NVRTC's default) only for devices older than all of them. Never
/// the default on a newer device: the default is too old for the tensor-core instructions.
fn virtual_arch(device: &CudaDevice) -> Option<&'static str> {
    const KNOWN: [((i32, i32), &str); 7] = [
        ((12, 0), "compute_120"),
        ((10, 0), "compute_100"),
        ((9, 0), "compute_90"),
        ((8, 9), "compute_89"),
        ((8, 6), "compute_86"),
        ((8, 0), "compute_80"),
        ((7, 5), "compute_75"),
    ];
    let capability = compute_capability(device)?;
    KNOWN
        .iter()
        .find(|(known, _)| *known <= capability)
        .map(|(_, arch)| *arch)
}

/// One kernel loaded on a device, with the device's stream to launch it on.
pub struct Kernel {
    function: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch on the device's stream, to push the kernel's arguments onto.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.function)
    }
}

/// The kernel `name` of `source` on `device`.
pub fn function(source: &KernelSource, device: &CudaDevice, name: &str) -> Result<Kernel> {
    let loaded = device.get_or_load_custom_func(name, source.module, ptx(source, device)?)?;
    Ok(Kernel {
        function: loaded.into_cuda_function(),
        stream: device.cuda_stream(),
    })
}

fn cuda_error(e: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("CUDA kernel launch failed: {e}"))
}

/// The CUDA device of `t`, if it is on one.
pub fn cuda_device(t: &Tensor) -> Option<CudaDevice> {
    match t.device() {
        Device::Cuda(device) => Some(device.clone()),
        _ => None,
    }
}

/// The elements of a contiguous tensor's CUDA storage (see [`Tensor::storage_and_layout`]).
pub fn view<'s, T: CudaDType>(storage: &'s Storage, layout: &Layout) -> Result<CudaView<'s, T>> {
    let Storage::Cuda(cuda) = storage else {
        return Err(Error::Cuda("expected a tensor on a CUDA device".into()));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Cuda("expected a contiguous tensor".into()))?;
    Ok(cuda.as_cuda_slice::<T>()?.slice(start..end))
}

/// Runs `f` on [`view`]s of `tensors`, made contiguous first: the storage guards the views
/// borrow live for the call (the CUDA counterpart of [`crate::cpu::with_f32_slices`]).
pub fn with_views<T: CudaDType, R, E: From<Error> + From<candle_core::Error>>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[CudaView<'_, T>]) -> std::result::Result<R, E>,
) -> std::result::Result<R, E> {
    let contiguous = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(|(storage, layout)| view::<T>(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    f(&views)
}

/// [`view`] of an optional input's storage guard (from [`Tensor::storage_and_layout`]),
/// for a kernel argument that may be null ([`arg_or_null`]).
pub fn optional_view<'s, T: CudaDType>(
    guard: &'s Option<(impl std::ops::Deref<Target = Storage>, &Layout)>,
) -> Result<Option<CudaView<'s, T>>> {
    guard
        .as_ref()
        .map(|(storage, layout)| view::<T>(storage, layout))
        .transpose()
}

/// Pushes an optional input onto a launch: its elements, or a null pointer when absent.
pub fn arg_or_null<'a, 'c: 'a, T>(
    builder: &mut LaunchArgs<'a>,
    input: Option<&'a CudaView<'c, T>>,
) {
    match input {
        Some(input) => builder.arg(input),
        None => builder.arg(&0u64),
    };
}

/// Runs `write` (a kernel launch) on the elements of the contiguous CUDA tensor `t` in
/// place, with candle holding `t`'s storage locked for writing meanwhile: a kernel that adds
/// into a running sum, instead of a fresh buffer and a pass to add it. `t` must own its
/// storage (no other tensor may share it, e.g. one fresh from `Tensor::zeros`), and
/// `write` must not read `t` through another handle.
pub fn write_in_place<T: CudaDType, E: std::fmt::Display>(
    t: &Tensor,
    write: impl FnOnce(&mut CudaViewMut<'_, T>) -> std::result::Result<(), E>,
) -> Result<()> {
    /// The write as a candle in-place op; the closure runs once.
    struct InPlace<T, F> {
        write: std::cell::Cell<Option<F>>,
        dtype: std::marker::PhantomData<T>,
    }
    impl<T, E, F> InplaceOp1 for InPlace<T, F>
    where
        T: CudaDType,
        E: std::fmt::Display,
        F: FnOnce(&mut CudaViewMut<'_, T>) -> std::result::Result<(), E>,
    {
        fn name(&self) -> &'static str {
            "write_in_place"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("write_in_place: expected a tensor on a CUDA device")
        }
        fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("write_in_place: expected a contiguous tensor")
            };
            let write = self.write.take().ok_or_else(|| {
                candle_core::Error::Msg("write_in_place: the write ran twice".into())
            })?;
            let mut elements = storage.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            write(&mut elements).map_err(|e| candle_core::Error::Msg(e.to_string()))
        }
    }
    if cuda_device(t).is_none() {
        return Err(Error::Cuda("expected a tensor on a CUDA device".into()));
    }
    let op = InPlace {
        write: std::cell::Cell::new(Some(write)),
        dtype: std::marker::PhantomData,
    };
    t.inplace_op1(&op)?;
    Ok(())
}

/// A zeroed device buffer of `len` elements.
pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    device: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    device
        .cuda_stream()
        .alloc_zeros::<T>(len)
        .map_err(cuda_error)
}

/// A device buffer of `len` elements left uninitialised, for a kernel that writes all of them.
///
/// # Safety
/// Every element must be written by a kernel before anything reads it.
pub unsafe fn alloc_uninit<T: DeviceRepr>(device: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: as the caller promises.
    unsafe { device.cuda_stream().alloc::<T>(len) }.map_err(cuda_error)
}

/// A device buffer as a tensor of `shape` (no gradient tracking).
pub fn wrap<T: CudaDType>(
    slice: CudaSlice<T>,
    device: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// A size as the kernels' `int`; `what` names it in the error.
pub fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::Cuda(format!("{what} {value} is too large for the CUDA kernels")))
}

/// A grid of `blocks.0 × blocks.1` blocks of `threads` threads.
pub fn config(blocks: (usize, usize), threads: u32) -> Result<LaunchConfig> {
    let grid = |v: usize| {
        u32::try_from(v)
            .map_err(|_| Error::Cuda(format!("{v} blocks are too many for one kernel launch")))
    };
    Ok(LaunchConfig {
        grid_dim: (grid(blocks.0)?, grid(blocks.1)?, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Launches a kernel whose arguments `builder` holds.
///
/// # Safety
/// The arguments must be those of the kernel, in order, with buffers of the sizes the
/// kernel reads and writes for the grid of `config`.
pub unsafe fn launch(builder: &mut LaunchArgs, config: LaunchConfig) -> Result<()> {
    // SAFETY: as the caller promises.
    unsafe { builder.launch(config) }
        .map(|_| ())
        .map_err(cuda_error)
}
