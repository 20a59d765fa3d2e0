// File input and output for the emulation harnesses (see ../emulation.rs): inputs and
// outputs are raw little-endian arrays in the folder named by the harness's first argument.
#pragma once

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

// `count` values of type T from DIR/name.
template <typename T>
static std::vector<T> read(const std::string& dir, const char* name, size_t count) {
    std::vector<T> data(count);
    std::ifstream file(dir + "/" + name, std::ios::binary);
    file.read(reinterpret_cast<char*>(data.data()), count * sizeof(T));
    if (!file || file.gcount() != (std::streamsize)(count * sizeof(T))) {
        throw std::runtime_error(std::string("cannot read ") + std::to_string(count * sizeof(T)) +
                                 " bytes from " + name);
    }
    return data;
}

// Writes `data` to DIR/name.
template <typename T>
static void write(const std::string& dir, const char* name, const std::vector<T>& data) {
    std::ofstream file(dir + "/" + name, std::ios::binary);
    file.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(T));
}

// The integer command-line argument `i`.
static int int_arg(int argc, char** argv, int i) {
    if (i >= argc) {
        throw std::runtime_error("missing argument " + std::to_string(i));
    }
    return std::stoi(argv[i]);
}

// The harness's `main` for `harness DIR KERNEL ARGS...`: runs `body(dir, kernel)` and turns
// an exception into a message on stderr and exit status 2.
template <typename Body>
static int run_harness(int argc, char** argv, Body body) {
    try {
        if (argc < 3) {
            throw std::runtime_error("usage: harness DIR KERNEL ARGS...");
        }
        body(std::string(argv[1]), std::string(argv[2]));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "harness: %s\n", e.what());
        return 2;
    }
    return 0;
}
