# Builds and runs a tiny project that uses lcm, as a consumer would.
# MODE=find_package installs lcm into a temporary prefix first; MODE=subdirectory adds the
# source tree with add_subdirectory.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run_step)
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
    if(NOT status EQUAL 0)
        string(REPLACE ";" " " command "${ARGN}")
        message(FATAL_ERROR "consumer test step failed (${status}): ${command}")
    endif()
endfunction()

if(MODE STREQUAL "find_package")
    set(prefix ${WORK_DIR}/prefix)
    run_step(${CMAKE_COMMAND} --install ${LCM_BINARY_DIR} --prefix ${prefix})
    set(project_dir ${LCM_SOURCE_DIR}/test/consumer/find_package)
    set(extra_args -DCMAKE_PREFIX_PATH=${prefix})
else()
    set(project_dir ${LCM_SOURCE_DIR}/test/consumer/subdirectory)
    set(extra_args -DLCM_SOURCE_DIR=${LCM_SOURCE_DIR})
endif()

run_step(${CMAKE_COMMAND} -S ${project_dir} -B ${WORK_DIR}/build -G ${GENERATOR}
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release ${extra_args})
run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run_step(${WORK_DIR}/build/lcm-consumer)
