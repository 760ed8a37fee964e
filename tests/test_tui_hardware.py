"""The hardware panel's readings: NVML through a fake module (no GPU, one GPU, fields that raise)."""

from helpers_tui import GIB, FakeNvml, NVMLError, fixed_system, h200, monitor

from nibblora.tui.hardware import GpuReading, HardwareMonitor
from nibblora.tui.text import gpu_line, hardware_lines


def test_no_gpu_says_so_and_shows_cpu_and_ram():
    snapshot = monitor().read()
    assert snapshot.gpus == [] and snapshot.source == "none"
    assert hardware_lines(snapshot) == [
        "no GPU (NVML: NVML Shared Library Not Found)",
        "CPU 12% of 16 cores  RAM 20.0 GiB / 128.0 GiB",
    ]


def test_one_gpu_reads_every_field():
    snapshot = monitor([h200(procs={4242: 3 * GIB})]).read()
    assert snapshot.source == "nvml"
    assert snapshot.gpus == [
        GpuReading(0, "NVIDIA H200", 40 * GIB, 141 * GIB, 87.0, 61.0, 512.0, 700.0, {4242: 3 * GIB})
    ]
    assert gpu_line(snapshot.gpus[0]) == (
        "GPU0 NVIDIA H200  mem 40.0 GiB / 141.0 GiB (28%)  util 87%  temp 61C  power 512/700 W"
    )


def test_a_field_that_raises_reads_as_na_and_the_rest_still_shows():
    broken = h200(
        name=b"NVIDIA A100",
        util=NVMLError("Not Supported"),
        temp=NVMLError("GPU is lost"),
        power_mw=RuntimeError("driver hiccup"),
        procs=NVMLError("no permission"),
    )
    snapshot = monitor([broken, h200()]).read()
    first, second = snapshot.gpus
    assert first.name == "NVIDIA A100" and first.memory_used_bytes == 40 * GIB
    assert first.utilization_percent is None and first.temperature_c is None and first.power_w is None
    assert gpu_line(first) == "GPU0 NVIDIA A100  mem 40.0 GiB / 141.0 GiB (28%)  util n/a  temp n/a  power n/a"
    assert second.utilization_percent == 87.0


def test_memory_info_failing_shows_na_memory():
    snapshot = monitor([h200(used=NVMLError("Unknown Error"))]).read()
    assert gpu_line(snapshot.gpus[0]).startswith("GPU0 NVIDIA H200  mem n/a / n/a  util 87%")


def test_device_count_failing_never_raises():
    nvml = FakeNvml([h200()])
    nvml.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(NVMLError("driver gone"))
    snapshot = HardwareMonitor(nvml=nvml, cuda_fallback=None, system=fixed_system).read()
    assert snapshot.gpus == [] and "driver gone" in snapshot.gpu_note


def test_torch_cuda_fallback_when_nvml_is_missing():
    fallback = lambda: [GpuReading(0, "Fake GPU", 2 * GIB, 8 * GIB)]  # noqa: E731
    snapshot = HardwareMonitor(
        nvml=FakeNvml(init_error=NVMLError("no driver")), cuda_fallback=fallback, system=fixed_system
    ).read()
    assert snapshot.source == "torch.cuda"
    lines = hardware_lines(snapshot)
    assert lines[0] == "GPU0 Fake GPU  mem 2.0 GiB / 8.0 GiB (25%)  util n/a  temp n/a  power n/a"
    assert lines[1] == "(through torch.cuda: NVML unavailable (no driver))"


def test_failing_psutil_reads_as_na():
    def broken():
        raise OSError("no /proc")

    snapshot = HardwareMonitor(nvml=FakeNvml(init_error=NVMLError("x")), cuda_fallback=None, system=broken).read()
    assert hardware_lines(snapshot)[-1] == "CPU n/a  RAM n/a / n/a"
