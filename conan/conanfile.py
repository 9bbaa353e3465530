# Conan 2 recipe for lcm, a header-only library. Build it from the repository's top with
#   conan create conan/ --build=missing
# Conan is not packaged by Debian 12, so lcm's own scripts do not use this recipe.
from conan import ConanFile
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import copy
import os


class LcmConan(ConanFile):
    name = "lcm"
    version = "0.1.0"
    license = "Proprietary"
    description = "Header-only C++20 control plane for Cisco Modeling Labs license operations"
    topics = ("cml", "control-plane", "asio", "coroutines")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "../CMakeLists.txt", "../include/*", "../cmake/*"
    no_copy_source = True

    def requirements(self):
        self.requires("boost/1.81.0", transitive_headers=True)
        # The adapters' headers include these libraries' headers, so consumers see them too.
        self.requires("openssl/[>=3 <4]", transitive_headers=True)
        self.requires("sqlite3/[>=3.40 <4]", transitive_headers=True)
        self.requires("libpq/[>=15 <17]", transitive_headers=True)

    def layout(self):
        cmake_layout(self, src_folder="..")

    def generate(self):
        toolchain = CMakeToolchain(self)
        toolchain.cache_variables["LCM_BUILD_TESTS"] = False
        toolchain.cache_variables["LCM_BUILD_EXAMPLES"] = False
        toolchain.cache_variables["LCM_BUILD_BENCHMARKS"] = False
        toolchain.generate()

    def package(self):
        copy(self, "*.hpp", src=os.path.join(self.source_folder, "include"),
             dst=os.path.join(self.package_folder, "include"))

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.set_property("cmake_file_name", "lcm")
        # One component per CMake target of the project, so that a consumer links what it uses.
        components = (
            ("core", "lcm::lcm", ["boost::headers", "boost::json", "boost::url"]),
            ("transport", "lcm::transport", ["core", "openssl::ssl", "openssl::crypto"]),
            ("sqlite", "lcm::sqlite", ["core", "sqlite3::sqlite3"]),
            ("postgres", "lcm::postgres", ["core", "libpq::libpq"]),
        )
        for name, target, requires in components:
            component = self.cpp_info.components[name]
            component.set_property("cmake_target_name", target)
            component.bindirs = []
            component.libdirs = []
            component.requires = requires

    def package_id(self):
        self.info.clear()
