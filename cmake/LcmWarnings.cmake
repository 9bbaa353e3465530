# Warning flags for lcm's own targets (tests, examples, benchmarks). Consumers of the
# INTERFACE target get none of them.
function(lcm_set_warnings target)
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
        -Wold-style-cast -Wcast-align -Woverloaded-virtual)
endfunction()
