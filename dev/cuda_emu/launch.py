#!/usr/bin/python3
"""Rewrites CUDA source for the CPU emulator (dev/cuda_emu/cuda_runtime.h).

  launch.py IN OUT [IN OUT ...]

Every launch `kernel<<<grid, block[, smem]>>>(args);` becomes a call of emu_launch with a closure that
calls the kernel with the same arguments (evaluated once, at the launch), as does every
`cudaLaunchKernelEx(&config, kernel, args)` (an expression: emu_launch_config, which takes grid, block
and shared memory from the config), and every `extern __shared__ T name[];` becomes a pointer into the
launch's dynamic shared memory."""
import re
import sys


def split_top_level(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def kernel_name_start(src, j):
    """start index of `name` or `name<templ>` that ends just before src[j]"""
    k = j
    if src[k - 1] == ">":
        depth = 0
        while True:
            k -= 1
            if src[k] == ">":
                depth += 1
            elif src[k] == "<":
                depth -= 1
                if depth == 0:
                    break
    return re.search(r"[A-Za-z_][A-Za-z_0-9]*$", src[:k]).start()


def matching_paren(src, p):
    depth = 0
    for q in range(p, len(src)):
        if src[q] == "(":
            depth += 1
        elif src[q] == ")":
            depth -= 1
            if depth == 0:
                return q
    raise SystemExit("launch.py: unbalanced parentheses after a launch")


def rewrite_each(src, marker, one):
    """src with every launch that marker starts rewritten: one(src, j) gives (start, end, text) for the
    one whose marker is at j, text replacing src[start:end]"""
    out, i = [], 0
    while True:
        j = src.find(marker, i)
        if j < 0:
            out.append(src[i:])
            return "".join(out)
        start, end, text = one(src, j)
        out.append(src[i:start])
        out.append(text)
        i = end


def launch_ex(src, j):
    p = j + len("cudaLaunchKernelEx")
    q = matching_paren(src, p)
    parts = split_top_level(src[p + 1:q])
    k = 2                                       # the kernel's template arguments may hold commas too
    while ",".join(parts[1:k]).count("<") > ",".join(parts[1:k]).count(">"):
        k += 1
    config, kernel, args = parts[0].strip(), ",".join(parts[1:k]).strip(), ",".join(parts[k:])
    if not config.startswith("&"):
        raise SystemExit("launch.py: cudaLaunchKernelEx's config must be given as &name")
    return j, q + 1, ('emu_launch_config("%s", (const void *)%s, %s, [=, emu_args = std::make_tuple(%s)]() '
                      '{ std::apply(%s, emu_args); })' % (kernel.split("<")[0], kernel, config[1:], args, kernel))


def launch_chevrons(src, j):
    start = kernel_name_start(src, j)
    kernel = src[start:j]
    e = src.find(">>>", j)
    config = split_top_level(src[j + 3:e])
    if len(config) == 2:
        config.append("0")
    p = e + 3
    if src[p] != "(":
        raise SystemExit("launch.py: expected '(' after >>> for " + kernel)
    q = matching_paren(src, p)
    args = src[p + 1:q]
    return start, q + 1, ('do { auto emu_args = std::make_tuple(%s); emu_launch("%s", (const void *)%s, dim3(%s), dim3(%s), %s, '
                          '[=]() { std::apply(%s, emu_args); }); } while (0)'
                          % (args, kernel.split("<")[0], kernel, config[0], config[1], config[2], kernel))


def rewrite(src):
    src = rewrite_each(src, "cudaLaunchKernelEx(", launch_ex)
    src = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];", r"\1 *\2 = (\1 *)emu_dynamic_smem;", src)
    return rewrite_each(src, "<<<", launch_chevrons)


for src_path, dst_path in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(src_path) as f:
        text = f.read()
    with open(dst_path, "w") as f:
        f.write(rewrite(text))
