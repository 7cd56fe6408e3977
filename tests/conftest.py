"""pytest hooks: the measured errors against the reference, printed at the end of every run."""

from tests.parity import FP32_REL, MEASURED


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section(f"measured against the reference (asserted: <= {FP32_REL:.0e} of max |ref|)")
    for test, what, err in MEASURED:
        terminalreporter.write_line(f"{'bitwise' if err == 0 else f'{err:.1e}':>8}  {test}: {what}")
