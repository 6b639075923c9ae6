"""Child process of availability.try_fentry: load one fentry program and say how it went on the
last line of stdout. Exit 0 when it loaded."""

import sys


def main(function):
    try:
        from bcc import BPF
    except ImportError:
        print("bcc not importable (install Debian's python3-bpfcc)")
        return 1
    try:
        BPF(text=f"KFUNC_PROBE({function}) {{ return 0; }}")
    except Exception as e:  # bcc raises bare Exception with its message
        # bcc prints the kernel's errno ("Operation not permitted") on stderr; its exception
        # text is generic, so name the errno when the kernel refused
        print(f"refused on {function} (EPERM: the kernel denies fentry programs)"
              if "super-user" in str(e) or "not permitted" in str(e)
              else f"failed on {function}: {str(e).strip().splitlines()[-1]}")
        return 1
    print(f"loaded on {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
